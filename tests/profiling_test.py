import jax
import jax.numpy as jnp
import pytest

from ttsi_jax import profiling


def test_op_table_shares_out_the_wall_time_by_kind_and_op_name():
  def layers(x_LTD, w_LDD):
    def layer(x, w):
      y = jnp.tanh(x @ w)
      return y, y  # the stacked outputs: the scan's copies

    return jax.lax.scan(layer, x_LTD[0], w_LDD)[1].sum()

  # Donated arguments: every call gets its own copies.
  fn = jax.jit(jax.grad(layers, argnums=1), donate_argnums=(1,))
  x = jax.random.normal(jax.random.key(0), (4, 256, 256))
  w = jax.random.normal(jax.random.key(1), (4, 256, 256)) / 16
  table = profiling.op_table(fn, x, w, calls=3)
  assert w.is_deleted() is False
  kinds = table["kinds"]
  assert kinds[profiling.MATMUL] > 0 and kinds[profiling.OTHER] > 0
  assert sum(kinds.values()) <= table["wall_s"] * 1.05  # shared out, never counted twice
  names = [name for kind, name, _ in table["ops"] if kind == profiling.MATMUL]
  assert any(name.endswith("dot_general") for name in names), names
  assert sum(s for *_, s in table["ops"]) == pytest.approx(sum(kinds.values()))


def test_classify_reads_kernels_matmuls_and_scan_copies_from_the_compiled_hlo():
  forward = (
      'metadata={op_name="jit(_step)/jvp(Transformer)/while/body/closed_call/layers/mlp/up_proj/dot_general"}'
  )
  assert profiling.classify(f"%ynn_fusion.1 = f32[8,8]{{1,0}} fusion(%a, %b), {forward}") == (
      profiling.MATMUL,
      "forward/layers/mlp/up_proj/dot_general",
  )
  kernel = (
      '%ffi_call.3 = f32[8] custom-call(%a), custom_call_target="ttsi_lora_outer", '
      'metadata={op_name="x/ffi_call"}'
  )
  assert profiling.classify(kernel) == ("ttsi_lora_outer", "x/ffi_call")
  copy = 'metadata={op_name="jit(f)/transpose(jvp(Transformer))/while/body/dynamic_update_slice"}'
  assert profiling.classify(f"%f = f32[2] fusion(%a), {copy}") == (
      profiling.SCAN_COPIES,
      "backward/dynamic_update_slice",
  )
  assert (
      profiling.classify('%add = f32[2] add(%a, %b), metadata={op_name="jit(f)/add"}')[0] == profiling.OTHER
  )
  gemm = '%custom-call.7 = (bf16[8,8], s8[0]) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"'
  assert profiling.classify(gemm)[0] == profiling.MATMUL
  fmha = (
      '%custom-call.8 = (bf16[8,8], f32[8]) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"'
  )
  assert profiling.classify(fmha)[0] == profiling.ATTENTION


def _op(pid, ts, dur, op, module="jit__step"):
  return {
      "ph": "X",
      "pid": pid,
      "ts": ts,
      "dur": dur,
      "name": op,
      "args": {"hlo_module": module, "hlo_op": op},
  }


def _process(pid, name):
  return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}


def test_wall_time_is_shared_among_overlapping_ops_of_the_module():
  events = [
      _process(1, "/host:CPU"),
      _op(1, 0, 10, "dot.1"),
      _op(1, 5, 10, "fusion.2"),  # overlaps dot.1 for 5 us: each gets half of those
      _op(1, 15, 3, "fusion.2", module="jit_other"),  # another program's op
  ]
  shared = profiling.share_wall_time(events, "jit__step", {"dot.1", "fusion.2"})
  assert shared == {"dot.1": 7.5, "fusion.2": 7.5}


def test_on_an_accelerator_only_the_devices_events_count_not_the_hosts_launches():
  events = [
      _process(1, "/host:CPU"),
      _process(2, "/device:GPU:0"),
      _op(1, 0, 50, "dot.1"),  # the host's launch of the gemm: not the work
      _op(1, 50, 50, "fusion.2"),
      _op(2, 20, 4, "dot.1"),
      _op(2, 30, 2, "fusion.2"),
  ]
  shared = profiling.share_wall_time(events, "jit__step", {"dot.1", "fusion.2"})
  assert shared == {"dot.1": 4, "fusion.2": 2}
  with pytest.raises(profiling.TraceError, match="no op of jit_other"):
    profiling.share_wall_time(events, "jit_other", {"dot.1"})


def test_a_command_buffers_kernels_count_by_instruction_or_library_kernel_name():
  def kernel(ts, dur, name):  # one kernel of a CUDA graph: hlo_op names the graph, not the kernel
    return {**_op(2, ts, dur, "command_buffer_3"), "name": name}

  events = [
      _process(1, "/host:CPU"),
      _process(2, "/device:GPU:0"),
      _op(1, 0, 40, "command_buffer_3"),  # the host's launch of the graph
      _op(2, 10, 14, "command_buffer_3"),  # the whole graph on the device: its kernels count instead
      kernel(10, 4, "loop_convert_fusion_1"),
      kernel(14, 6, "nvjet_sm90_tss_256x128_64x4_1x2_h_bz_coopA_TNT"),
      kernel(20, 3, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26"),
      kernel(23, 1, "memcpy128"),
  ]
  shared = profiling.share_wall_time(events, "jit__step", {"loop_convert_fusion_1", "command_buffer_3"})
  assert shared == {
      "loop_convert_fusion_1": 4,
      "nvjet_sm90_tss_256x128_64x4_1x2_h_bz_coopA_TNT": 6,
      "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": 3,
      "memcpy128": 1,
  }
  kinds = [profiling.classify_kernel(name)[0] for name in list(shared)[1:]]
  assert kinds == [profiling.MATMUL, profiling.ATTENTION, profiling.COPIES]
  assert profiling.classify_kernel("loop_add_fusion_5")[0] == profiling.OTHER
  assert profiling.classify_kernel("cudnn_cutlass_sm90_flash_bprop")[0] == profiling.ATTENTION


def test_a_fusion_without_metadata_is_named_by_its_fused_computations_root():
  hlo = """HloModule jit__step, entry_computation_layout={(bf16[2]{0})->f32[2]{0}}

%fused_convert.3 (param_0: bf16[2]) -> f32[2] {
  %param_0 = bf16[2]{0} parameter(0)
  ROOT %convert.1 = f32[2]{0} convert(%param_0), metadata={op_name="jit(_step)/transpose(jvp(T))/mlp/convert"}
}

%fused_multiply.4 (param_0: f32[2]) -> bf16[2] {
  %param_0 = f32[2]{0} parameter(0)
  %multiply.2 = f32[2]{0} multiply(%param_0, %param_0), metadata={op_name="jit(_step)/jvp(T)/mlp/mul"}
  ROOT %convert.3 = bf16[2]{0} convert(%multiply.2)
}

ENTRY %main.5 (p: bf16[2]) -> f32[2] {
  %p = bf16[2]{0} parameter(0)
  %loop_convert_fusion_2 = f32[2]{0} fusion(%p), kind=kLoop, calls=%fused_convert.3
  ROOT %loop_multiply_fusion = bf16[2]{0} fusion(%loop_convert_fusion_2), kind=kLoop, calls=%fused_multiply.4
}
"""
  ops = profiling._hlo_ops(hlo)  # pylint: disable=protected-access
  assert profiling.classify(ops["loop_convert_fusion_2"]) == (profiling.OTHER, "backward/mlp/convert")
  # A root XLA made (no metadata): the fused computation's first op_name.
  assert profiling.classify(ops["loop_multiply_fusion"]) == (profiling.OTHER, "forward/mlp/mul")
  assert profiling.classify(ops["p"]) == (profiling.OTHER, "p")
