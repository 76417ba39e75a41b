// The host entries of the CUDA kernels (ladam_step_cuda, ...): check the tensors, build the tile
// table, upload it (or find it uploaded), launch on the current stream. A thin layer: the kernels
// in *.cu take raw pointers only. Compiled only where the extension is built with CUDA
// (FASTOPT_WITH_CUDA).
#ifdef FASTOPT_WITH_CUDA

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <list>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda_launch.h"
#include "gram.h"
#include "ops.h"
#include "tensor_lists.h"

namespace fastopt {
namespace {

cuda::DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kHalf;
    default: TORCH_CHECK(false, "fastopt: unsupported dtype ", t);
  }
}

// The launch's device-side tables; the tensors keep them alive until the kernels have run (the
// caching allocators order their reuse after the current stream's work).
struct Launch {
  at::Tensor table;  // TensorArgs[n], then Tile[n_tiles]
  at::Tensor halo;
  cuda::LaunchArgs args;
};

const float* scalar_pointer(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

// The device copy of a table, by content. A table's bytes are a function of the tensors'
// addresses, grids and step-count addresses only (every byte set: TensorGrid's padding is an
// explicit 0), so equal bytes are an equal table whichever step built them: a step whose tensors
// did not move (the usual case with zero_grad(set_to_none=False), and every replay of a captured
// step) uploads nothing. That is what makes a step capturable into a CUDA graph: an upload inside
// a capture would be replayed from a pinned buffer the host allocator hands out again, so a miss
// there is refused.
//
// Lifetimes: a table is used on the stream it was uploaded on (a hit from another stream uploads
// anew), so the caching allocator's stream order covers its reuse once evicted; a table a capture
// used is also kept for the rest of the process, since the graph reads its address at every replay.
struct CachedTable {
  std::string key;
  at::Tensor table;
  cudaStream_t stream;
};

at::Tensor device_table(std::string bytes, const at::Device& device) {
  constexpr size_t kMaxTables = 64;  // recent lists: one per (group, dtype) bucket of each optimizer
  static std::mutex mutex;
  static std::list<CachedTable> cache;      // most recent first
  static std::vector<at::Tensor> captured;  // read by captured graphs: never freed
  const int8_t index = device.index();
  bytes.append(reinterpret_cast<const char*>(&index), sizeof(index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->key != bytes) continue;
    if (capturing) {
      // Uploaded before the capture on whatever stream (torch.cuda.graph synchronizes on entry).
      const void* address = it->table.data_ptr();
      if (std::none_of(captured.begin(), captured.end(), [&](const at::Tensor& t) { return t.data_ptr() == address; })) {
        captured.push_back(it->table);
      }
    } else if (it->stream != stream) {
      cache.erase(it);
      break;
    }
    cache.splice(cache.begin(), cache, it);
    return cache.front().table;
  }
  TORCH_CHECK(!capturing,
              "fastopt (cuda): this step's tensors (or gradients) are not where the last step found them, so their "
              "table would have to be uploaded inside a CUDA-graph capture. Run a step before capture, keep the "
              "gradients in place (optimizer.zero_grad(set_to_none=False)) and parameters and gradients contiguous "
              "(non-contiguous ones are stepped through new contiguous copies)");
  // Staged in pinned memory so that the copy is asynchronous.
  at::Tensor host = at::empty({static_cast<int64_t>(bytes.size())},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
  at::Tensor table = host.to(device, /*non_blocking=*/true);
  cache.push_front(CachedTable{std::move(bytes), table, stream});
  if (cache.size() > kMaxTables) cache.pop_back();
  return table;
}

// ``values``: each tensor's scalar for the functor (TensorArgs::value: wave_variance's wave_e0_sqs); empty: none.
Launch prepare_launch(const StepTensors& st, std::initializer_list<at::TensorList> states, at::TensorList steps,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& lr_tensor, at::TensorList values = {}) {
  const size_t n = st.size();
  std::vector<cuda::TensorArgs> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    cuda::TensorArgs& t = tensors[i];
    t.p = st.params[i].data_ptr();
    t.g = st.grads[i].const_data_ptr();
    t.state[0] = t.state[1] = t.state[2] = nullptr;
    int k = 0;
    for (at::TensorList s : states) t.state[k++] = s[i].data_ptr();
    t.value = values.empty() ? nullptr : values[i].data_ptr();
    t.step = steps[i].const_data_ptr<float>();
    t.grid = st.grids[i];
  }
  const TilePlan plan = plan_tiles(st.grids, cuda::kPolicy);
  const bool dbl = st.dtype == at::kDouble;
  const int64_t math_size = dbl ? 8 : 4;
  int64_t smem_elems = 0;
  for (const Tile& tile : plan.tiles) {
    const bool vertical = is_vertical(st.grids[tile.tensor].smooth);
    smem_elems = std::max(smem_elems, (vertical ? tile.nrows + 2 : 1) * (tile.ncols + 2));
  }
  const size_t tensor_bytes = n * sizeof(cuda::TensorArgs);
  const size_t tile_offset = (tensor_bytes + 15) / 16 * 16;
  const size_t bytes = tile_offset + plan.tiles.size() * sizeof(Tile);
  const at::Device device = st.params[0].device();
  std::string host(bytes, '\0');
  std::memcpy(host.data(), tensors.data(), tensor_bytes);
  std::memcpy(host.data() + tile_offset, plan.tiles.data(), plan.tiles.size() * sizeof(Tile));
  Launch launch;
  launch.table = device_table(std::move(host), device);
  if (plan.halo_elems) {
    launch.halo = at::empty({plan.halo_elems * math_size}, at::TensorOptions().dtype(at::kByte).device(device));
  }
  char* base = static_cast<char*>(launch.table.data_ptr());
  launch.args = cuda::LaunchArgs{reinterpret_cast<const cuda::TensorArgs*>(base),
                                 reinterpret_cast<const Tile*>(base + tile_offset),
                                 static_cast<int64_t>(plan.tiles.size()),
                                 plan.halo_elems ? launch.halo.data_ptr() : nullptr,
                                 smem_elems * math_size,
                                 dtype_code(st.dtype),
                                 c10::cuda::getCurrentCUDAStream(device.index()).stream(),
                                 cuda::DeviceScalars{scalar_pointer(grad_scale), scalar_pointer(found_inf),
                                                     scalar_pointer(lr_tensor)}};
  return launch;
}

}  // namespace

namespace {

using LAdamLaunch = cudaError_t (*)(const cuda::LaunchArgs&, double, double, double, double, double, double);

// The LAdam modes with an EMA of g^2 take the same tensors and hyperparameters.
void run_ladam_mode(const char* op, LAdamLaunch launch_fn, at::TensorList params, at::TensorList grads,
                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                    const c10::List<bool>& use_laps, double lr, double beta1, double beta2, double eps,
                    double weight_decay, double c2, c10::string_view stencil,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& lr_tensor) {
  StepTensors st = prepare_step(op, c10::DeviceType::CUDA, params, grads,
                                {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, steps, use_laps, stencil,
                                /*steps_on_device=*/true);
  if (st.size() == 0) return;
  check_device_scalars(op, grad_scale, found_inf, lr_tensor, st.params[0].device());
  const c10::cuda::CUDAGuard guard(st.params[0].device());
  const Launch launch = prepare_launch(st, {exp_avgs, exp_avg_sqs}, steps, grad_scale, found_inf, lr_tensor);
  C10_CUDA_CHECK(launch_fn(launch.args, lr, beta1, beta2, eps, weight_decay, c2));
  st.write_back();
}

}  // namespace

void ladam_step_cuda(FASTOPT_LADAM_STEP_ARGS) {
  run_ladam_mode("ladam_step", cuda::launch_ladam_step, params, grads, exp_avgs, exp_avg_sqs, steps, use_laps, lr,
                 beta1, beta2, eps, weight_decay, c2, stencil, grad_scale, found_inf, lr_tensor);
}

void ladam_update_lap_step_cuda(FASTOPT_LADAM_STEP_ARGS) {
  run_ladam_mode("ladam_update_lap_step", cuda::launch_ladam_update_lap_step, params, grads, exp_avgs, exp_avg_sqs,
                 steps, use_laps, lr, beta1, beta2, eps, weight_decay, c2, stencil, grad_scale, found_inf, lr_tensor);
}

void ladam_weight_lap_step_cuda(FASTOPT_LADAM_STEP_ARGS) {
  run_ladam_mode("ladam_weight_lap_step", cuda::launch_ladam_weight_lap_step, params, grads, exp_avgs, exp_avg_sqs,
                 steps, use_laps, lr, beta1, beta2, eps, weight_decay, c2, stencil, grad_scale, found_inf, lr_tensor);
}

void ladam_wave_step_cuda(FASTOPT_LADAM_WAVE_STEP_ARGS) {
  const char* op = "ladam_wave_step";
  StepTensors st = prepare_step(
      op, c10::DeviceType::CUDA, params, grads,
      {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"prev_exp_avg_sqs", prev_exp_avg_sqs}}, steps, use_laps,
      stencil, /*steps_on_device=*/true);
  if (st.size() == 0) return;
  check_scalar_states(op, "wave_e0_sqs", wave_e0_sqs, params);
  check_device_scalars(op, grad_scale, found_inf, lr_tensor, st.params[0].device());
  const c10::cuda::CUDAGuard guard(st.params[0].device());
  const Launch launch = prepare_launch(st, {exp_avgs, exp_avg_sqs, prev_exp_avg_sqs}, steps, grad_scale, found_inf,
                                       lr_tensor, wave_e0_sqs);
  // The first step's E0^2 reduction (wave_E0 == 0) needs a double per tile; the kernels decide per
  // tensor, from its step count, whether it records (ladam_wave_step.cu).
  at::Tensor partials;
  if (wave_E0 == 0 && launch.args.n_tiles > 0) {
    partials = at::empty({launch.args.n_tiles}, st.params[0].options().dtype(at::kDouble));
  }
  const cuda::WaveArgs wave{lr,
                            beta1,
                            eps,
                            weight_decay,
                            c2,
                            wave_dt,
                            wave_kappa,
                            wave_E0,
                            wave_damping,
                            static_cast<int64_t>(st.size()),
                            partials.defined() ? partials.data_ptr<double>() : nullptr};
  C10_CUDA_CHECK(cuda::launch_ladam_wave_step(launch.args, wave));
  st.write_back();
}

void ladagrad_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
                        const c10::List<bool>& use_laps, double lr, double lr_decay, double eps, double weight_decay,
                        double c2, c10::string_view stencil, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf,
                        const std::optional<at::Tensor>& lr_tensor) {
  StepTensors st = prepare_step("ladagrad_step", c10::DeviceType::CUDA, params, grads,
                                {{"state_sums", state_sums}}, steps, use_laps, stencil, /*steps_on_device=*/true);
  if (st.size() == 0) return;
  check_device_scalars("ladagrad_step", grad_scale, found_inf, lr_tensor, st.params[0].device());
  const c10::cuda::CUDAGuard guard(st.params[0].device());
  const Launch launch = prepare_launch(st, {state_sums}, steps, grad_scale, found_inf, lr_tensor);
  C10_CUDA_CHECK(cuda::launch_ladagrad_step(launch.args, lr, lr_decay, eps, weight_decay, c2));
  st.write_back();
}

void lrmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                        at::TensorList momentum_buffers, at::TensorList steps, const c10::List<bool>& use_laps,
                        double lr, double alpha, double eps, double weight_decay, double momentum, double c2,
                        c10::string_view stencil, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf,
                        const std::optional<at::Tensor>& lr_tensor) {
  const bool with_momentum = momentum > 0;
  StepTensors st =
      with_momentum
          ? prepare_step("lrmsprop_step", c10::DeviceType::CUDA, params, grads,
                         {{"square_avgs", square_avgs}, {"momentum_buffers", momentum_buffers}}, steps, use_laps,
                         stencil, /*steps_on_device=*/true)
          : prepare_step("lrmsprop_step", c10::DeviceType::CUDA, params, grads, {{"square_avgs", square_avgs}}, steps,
                         use_laps, stencil, /*steps_on_device=*/true);
  if (st.size() == 0) return;
  check_device_scalars("lrmsprop_step", grad_scale, found_inf, lr_tensor, st.params[0].device());
  const c10::cuda::CUDAGuard guard(st.params[0].device());
  const Launch launch = with_momentum
                            ? prepare_launch(st, {square_avgs, momentum_buffers}, steps, grad_scale, found_inf, lr_tensor)
                            : prepare_launch(st, {square_avgs}, steps, grad_scale, found_inf, lr_tensor);
  C10_CUDA_CHECK(cuda::launch_lrmsprop_step(launch.args, lr, alpha, eps, weight_decay, momentum, c2));
  st.write_back();
}

void jacobian_products_cuda(const at::Tensor& a, const at::Tensor& out, double scale,
                            const std::optional<at::Tensor>& shift) {
  check_jacobian_products(a, out, shift, c10::DeviceType::CUDA);
  const int64_t m = a.size(1);
  TORCH_CHECK_VALUE((m + 31) / 32 * ((m + 31) / 32 + 1) / 2 < (int64_t{1} << 31),
                    "jacobian_products: a has too many columns for one launch: ", m);
  const c10::cuda::CUDAGuard guard(a.device());
  // The shift in out's dtype, contiguous; the tensor lives until the kernel has read it (the
  // caching allocator orders its reuse after the current stream's work).
  const at::Tensor shift_m = shift.has_value() ? shift->to(out.scalar_type()).contiguous() : at::Tensor();
  const cuda::JacobianProductsArgs args{a.const_data_ptr(), a.size(0), m, a.stride(0), a.stride(1), out.data_ptr(),
                                        out.stride(0), out.stride(1), shift_m.defined() ? shift_m.const_data_ptr() : nullptr,
                                        dtype_code(a.scalar_type()),
                                        c10::cuda::getCurrentCUDAStream(a.device().index()).stream()};
  C10_CUDA_CHECK(cuda::launch_jacobian_products(args, scale));
}

std::tuple<at::Tensor, at::Tensor> batched_gram_cuda(const at::Tensor& jac, const at::Tensor& res) {
  check_batched_gram(jac, res, c10::DeviceType::CUDA);
  const int64_t batch = jac.size(0), n = jac.size(1), p = jac.size(2);
  TORCH_CHECK_VALUE(batch < (int64_t{1} << 31) && (p + 32) / 32 * ((p + 32) / 32 + 1) / 2 <= 65535,
                    "batched_gram: too many problems or parameters for one launch: jac has shape ", jac.sizes());
  const c10::cuda::CUDAGuard guard(jac.device());
  at::Tensor jtj = at::empty({batch, p, p}, jac.options());
  at::Tensor jtr = at::empty({batch, p}, jac.options());
  const cuda::BatchedGramArgs args{jac.const_data_ptr(), res.const_data_ptr(), batch, n, p, jac.stride(0),
                                   jac.stride(1), jac.stride(2), res.stride(0), res.stride(1), jtj.data_ptr(),
                                   jtr.data_ptr(), dtype_code(jac.scalar_type()),
                                   c10::cuda::getCurrentCUDAStream(jac.device().index()).stream()};
  C10_CUDA_CHECK(cuda::launch_batched_gram(args));
  return {jtj, jtr};
}

}  // namespace fastopt

#endif  // FASTOPT_WITH_CUDA
