// pcl_ext::proto_nce on the CPU, called through the dispatcher: loss and gradients against a
// naive ATen ProtoNCE (pcl_ext/reference.py, differentiated by autograd), determinism, and the
// argument errors. The library is built on the LibTorch stable ABI; the tests use ATen.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Tensors = std::vector<at::Tensor>;
using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // loss, dq, dk, correct

struct Inputs {
  at::Tensor q, k, queue;
  Tensors prototypes, phi, assignments, negatives;  // negatives empty: all-prototype mode
  double temperature = 0.2;
};

Out call_op(const Inputs& x) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pcl_ext::proto_nce", "")
          .typed<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                     at::TensorList, at::TensorList, at::TensorList, double, bool)>();
  return op.call(x.q, x.k, x.queue, x.prototypes, x.phi, x.assignments, x.negatives,
                 x.temperature, /*allow_tf32=*/false);
}

// Float64 inputs with L2-normalized rows; M clusterings of K[m] prototypes.
Inputs make_inputs(int64_t n, int64_t d, int64_t q_len, std::vector<int64_t> ks, bool sampled,
                   uint64_t seed = 0) {
  at::manual_seed(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto unit_rows = [&](int64_t rows) {
    const at::Tensor t = at::randn({rows, d}, f64);
    return t / t.norm(2, {1}, /*keepdim=*/true);
  };
  Inputs x;
  x.q = unit_rows(n);
  x.k = unit_rows(n);
  x.queue = unit_rows(q_len);
  for (int64_t kk : ks) {
    x.prototypes.push_back(unit_rows(kk));
    x.phi.push_back(at::rand({kk}, f64) * 0.5 + 0.05);
    x.assignments.push_back(at::randint(kk, {n}, at::kLong));
    if (sampled) x.negatives.push_back(at::randperm(kk, at::kLong).narrow(0, 0, kk / 2));
  }
  return x;
}

// PCL's loss with every logit materialized, exactly as pcl_ext/reference.py.
at::Tensor reference_loss(const Inputs& x, const at::Tensor& q, const at::Tensor& k) {
  const int64_t n = q.size(0);
  const at::Tensor l_pos = (q * k).sum(1, /*keepdim=*/true);                  // Nx1
  const at::Tensor logits = at::cat({l_pos, at::mm(q, x.queue.t())}, 1) / x.temperature;
  at::Tensor loss = at::cross_entropy_loss(logits, at::zeros({n}, at::kLong));
  if (x.prototypes.empty()) return loss;
  at::Tensor proto_loss = at::zeros({}, q.options());
  for (size_t m = 0; m < x.prototypes.size(); ++m) {
    if (x.negatives.empty()) {
      const at::Tensor l = at::mm(q, x.prototypes[m].t()) / x.phi[m];            // NxK
      proto_loss = proto_loss + at::cross_entropy_loss(l, x.assignments[m]);
    } else {
      const at::Tensor ids = at::cat({x.assignments[m], x.negatives[m]});       // N+r
      const at::Tensor l = at::mm(q, x.prototypes[m].index_select(0, ids).t()) /
                           x.phi[m].index_select(0, ids);
      proto_loss = proto_loss + at::cross_entropy_loss(l, at::arange(n, at::kLong));
    }
  }
  return loss + proto_loss / static_cast<double>(x.prototypes.size());
}

struct Case {
  std::vector<int64_t> ks;
  bool sampled;
};

class ProtoNCEMatchesReference : public ::testing::TestWithParam<Case> {};

TEST_P(ProtoNCEMatchesReference, LossAndGradients) {
  const Case c = GetParam();
  const Inputs x = make_inputs(/*n=*/5, /*d=*/7, /*q_len=*/9, c.ks, c.sampled);
  const auto [loss, dq, dk, correct] = call_op(x);
  EXPECT_EQ(correct.sizes(), (std::vector<int64_t>{1 + static_cast<int64_t>(c.ks.size()), 5}));

  const at::Tensor q = x.q.detach().requires_grad_(), k = x.k.detach().requires_grad_();
  const at::Tensor ref = reference_loss(x, q, k);
  ref.backward();
  EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-10);
  EXPECT_TRUE(at::allclose(dq, q.grad(), /*rtol=*/0, /*atol=*/1e-10)) << dq - q.grad();
  EXPECT_TRUE(at::allclose(dk, k.grad(), /*rtol=*/0, /*atol=*/1e-10)) << dk - k.grad();
}

INSTANTIATE_TEST_SUITE_P(Modes, ProtoNCEMatchesReference,
                         ::testing::Values(Case{{}, false},  // the instance term alone
                                           Case{{4, 6}, false}, Case{{4, 6}, true}),
                         [](const auto& info) {
                           return "M" + std::to_string(info.param.ks.size()) +
                                  (info.param.sampled ? "_sampled" : "_all");
                         });

void expect_bitwise_equal(const Out& a, const Out& b) {
  EXPECT_TRUE(at::equal(std::get<0>(a), std::get<0>(b)));
  EXPECT_TRUE(at::equal(std::get<1>(a), std::get<1>(b)));
  EXPECT_TRUE(at::equal(std::get<2>(a), std::get<2>(b)));
  EXPECT_TRUE(at::equal(std::get<3>(a), std::get<3>(b)));
}

// A queue long enough to be split into several chunks, so that threads really share the work.
TEST(ProtoNCE, DeterministicAcrossRunsAndThreadCounts) {
  for (bool sampled : {false, true}) {
    const Inputs x = make_inputs(33, 17, 2500, {40, 3}, sampled);
    const int threads = at::get_num_threads();
    at::set_num_threads(1);
    const auto one = call_op(x);
    at::set_num_threads(2);
    const auto two = call_op(x);
    expect_bitwise_equal(one, two);
    expect_bitwise_equal(two, call_op(x));
    at::set_num_threads(threads);
  }
}

// Runs the op on `x` and expects an E whose message contains `needle` (the kernel throws
// std::out_of_range and std::invalid_argument: Python's IndexError and ValueError).
template <typename E>
void expect_error(const Inputs& x, const std::string& needle) {
  try {
    call_op(x);
    ADD_FAILURE() << "no error, expected one mentioning " << needle;
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(ProtoNCE, RejectsBadArguments) {
  const Inputs good = make_inputs(5, 7, 9, {4, 6}, true);

  Inputs x = good;
  x.assignments[0] = good.assignments[0].clone();
  x.assignments[0][2] = 4;  // K[0] = 4
  expect_error<std::out_of_range>(x, "assignments[0]");

  x = good;
  x.negatives[1] = at::tensor({-1}, at::kLong);
  expect_error<std::out_of_range>(x, "negatives[1]");

  x = good;
  x.phi[1] = good.phi[1].clone();
  x.phi[1][3] = 0.0;
  expect_error<std::invalid_argument>(x, "phi[1]");

  x = good;
  x.phi.pop_back();
  expect_error<std::invalid_argument>(x, "`phi`");

  x = good;
  x.negatives.pop_back();
  expect_error<std::invalid_argument>(x, "`negatives`");
}

}  // namespace
