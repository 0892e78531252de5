// pcl_ext::info_nce and info_nce_backward on the CPU, called through the dispatcher: losses, the
// per-row query gradient and the key gradient against InfoNCE with every logit materialized
// (ATen autograd, float64), determinism across thread counts, and the argument errors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>

namespace {

using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // losses, lse, dq, correct

struct Inputs {
  at::Tensor q, k, targets;
  double temperature = 0.3;
  bool exclude_self = false;
};

Out forward(const Inputs& x, bool grad_queries = true) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pcl_ext::info_nce", "")
          .typed<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool, bool,
                     bool)>();
  return op.call(x.q, x.k, x.targets, x.temperature, x.exclude_self, grad_queries,
                 /*allow_tf32=*/false);
}

at::Tensor backward_keys(const Inputs& x, const at::Tensor& grad_losses, const at::Tensor& lse) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pcl_ext::info_nce_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double, bool, bool)>();
  return op.call(grad_losses, x.q, x.k, x.targets, lse, x.temperature, x.exclude_self,
                 /*allow_tf32=*/false);
}

// Float64 unit rows; targets drawn from [0, K), never i itself under exclude_self.
Inputs make_inputs(int64_t n, int64_t k, int64_t d, bool exclude_self, uint64_t seed = 0) {
  at::manual_seed(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto unit_rows = [&](int64_t rows) {
    const at::Tensor t = at::randn({rows, d}, f64);
    return t / t.norm(2, {1}, /*keepdim=*/true);
  };
  Inputs x;
  x.q = unit_rows(n);
  x.k = unit_rows(k);
  x.exclude_self = exclude_self;
  x.targets = at::randint(k, {n}, at::kLong);
  if (exclude_self) {  // move a self target one column on
    const at::Tensor rows = at::arange(n, at::kLong);
    x.targets = at::where(x.targets == rows, (x.targets + 1) % k, x.targets);
  }
  return x;
}

// Every logit: losses_i = logsumexp_j s_ij - s_i,targets_i, s = q k^T / T (diagonal -inf when
// exclude_self).
at::Tensor reference_losses(const Inputs& x, const at::Tensor& q, const at::Tensor& k) {
  at::Tensor s = at::mm(q, k.t()) / x.temperature;
  if (x.exclude_self) {
    const int64_t n = q.size(0);
    const at::Tensor self = at::eye(n, k.size(0), at::TensorOptions().dtype(at::kBool));
    s = s.masked_fill(self, -std::numeric_limits<double>::infinity());
  }
  return at::logsumexp(s, {1}) - s.gather(1, x.targets.unsqueeze(1)).squeeze(1);
}

class InfoNCEMatchesReference : public ::testing::TestWithParam<bool> {};

TEST_P(InfoNCEMatchesReference, LossesAndGradients) {
  const Inputs x = make_inputs(/*n=*/6, /*k=*/9, /*d=*/5, /*exclude_self=*/GetParam());
  const auto [losses, lse, dq, correct] = forward(x);
  const at::Tensor grad_losses = at::rand({6}, at::TensorOptions().dtype(at::kDouble)) + 0.5;
  const at::Tensor dk = backward_keys(x, grad_losses, lse);

  const at::Tensor q = x.q.detach().requires_grad_(), k = x.k.detach().requires_grad_();
  const at::Tensor ref = reference_losses(x, q, k);
  EXPECT_TRUE(at::allclose(losses, ref, /*rtol=*/0, /*atol=*/1e-12)) << losses - ref;
  // Row i's loss depends on q_i alone: d(sum losses)/dq is the per-row gradient the op returns.
  ref.sum().backward();
  EXPECT_TRUE(at::allclose(dq, q.grad(), /*rtol=*/0, /*atol=*/1e-12)) << dq - q.grad();
  const at::Tensor k2 = x.k.detach().requires_grad_();
  (reference_losses(x, x.q, k2) * grad_losses).sum().backward();
  EXPECT_TRUE(at::allclose(dk, k2.grad(), /*rtol=*/0, /*atol=*/1e-12)) << dk - k2.grad();

  // A hit: the target's logit is the row's largest (no ties in random float64 data).
  at::Tensor s = at::mm(x.q, x.k.t());
  if (x.exclude_self) s.diagonal().fill_(-std::numeric_limits<double>::infinity());
  EXPECT_TRUE(at::equal(correct, s.argmax(1) == x.targets));

  // Without the query gradient: the same losses, and an empty dq.
  const auto [losses2, lse2, dq2, correct2] = forward(x, /*grad_queries=*/false);
  EXPECT_TRUE(at::equal(losses2, losses));
  EXPECT_EQ(dq2.numel(), 0);
}

INSTANTIATE_TEST_SUITE_P(Modes, InfoNCEMatchesReference, ::testing::Values(false, true),
                         [](const auto& info) {
                           return std::string(info.param ? "exclude_self" : "all_columns");
                         });

// Enough keys for several column chunks, so that threads really share the work.
TEST(InfoNCE, DeterministicAcrossThreadCounts) {
  const Inputs x = make_inputs(40, 2600, 17, /*exclude_self=*/true, /*seed=*/3);
  const at::Tensor g = at::ones({40}, at::TensorOptions().dtype(at::kDouble));
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const Out one = forward(x);
  const at::Tensor dk_one = backward_keys(x, g, std::get<1>(one));
  at::set_num_threads(2);
  const Out two = forward(x);
  const at::Tensor dk_two = backward_keys(x, g, std::get<1>(two));
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(std::get<0>(one), std::get<0>(two)));
  EXPECT_TRUE(at::equal(std::get<2>(one), std::get<2>(two)));
  EXPECT_TRUE(at::equal(std::get<3>(one), std::get<3>(two)));
  EXPECT_TRUE(at::equal(dk_one, dk_two));
}

template <typename E>
void expect_error(const Inputs& x, const std::string& needle) {
  try {
    forward(x);
    ADD_FAILURE() << "no error, expected one mentioning " << needle;
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(InfoNCE, RejectsBadArguments) {
  const Inputs good = make_inputs(4, 6, 3, /*exclude_self=*/true);

  Inputs x = good;
  x.targets = good.targets.clone();
  x.targets[1] = 6;  // K = 6
  expect_error<std::out_of_range>(x, "`targets`");

  x = good;
  x.targets = good.targets.clone();
  x.targets[2] = 2;  // its own column, which exclude_self removes
  expect_error<std::invalid_argument>(x, "targets[2]");

  x = good;
  x.temperature = 0.0;
  expect_error<std::invalid_argument>(x, "`temperature`");

  x = good;
  x.k = good.k.to(at::kFloat);
  expect_error<std::invalid_argument>(x, "`keys`");

  x = make_inputs(7, 6, 3, /*exclude_self=*/false);
  x.exclude_self = true;  // N > K
  expect_error<std::invalid_argument>(x, "N <= K");
}

}  // namespace
