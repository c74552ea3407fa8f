"""Mixed precision: bf16 autocast keeps fp32 master weights and lands where fp32 lands."""

import json
import warnings

import pytest
import torch

import tunelab
from helpers import toy_rows
from tunelab.device import CPU_BF16_ENV, cpu_capability, cpu_has_amx, cpu_has_native_bf16, resolve_precision


def test_bf16_autocast_reaches_the_fp32_eval_loss(tmp_path, write_jsonl):
    cfg = {
        "model": "tiny-llama",
        "out_dir": str(tmp_path / "runs"),
        "seed": 0,
        "data": {"train": str(write_jsonl(toy_rows(64))), "val_fraction": 0.25, "max_length": 48},
        "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0},
        "lora": {"dropout": 0.0},
    }
    fp32 = tunelab.train(cfg | {"run_name": "fp32", "train": cfg["train"] | {"precision": "fp32"}}, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AVX2-only CPUs warn that bf16 is slow; the tiny model does not mind
        bf16 = tunelab.train(cfg | {"run_name": "bf16", "train": cfg["train"] | {"precision": "bf16"}}, progress=False)
    assert bf16.summary["precision"] == "bf16"
    a, b = fp32.summary["eval"]["eval_loss"], bf16.summary["eval"]["eval_loss"]
    first = json.loads((fp32.run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert a < 0.85 * first  # it learned (11.0 -> 9.0 here): the comparison means something
    assert abs(a - b) / a < 0.03, (a, b)
    print(f"fp32 eval loss {a:.4f}, bf16 {b:.4f}")
    # the saved adapter (master weights) is fp32
    from safetensors import safe_open

    with safe_open(str(bf16.run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_never_picks_slow_bf16_on_cpu(monkeypatch, native):
    """Both CPU kinds, whatever this machine is: the capability switch forces the detection."""
    from tunelab.methods.lora import compute_dtype

    monkeypatch.setenv(CPU_BF16_ENV, "1" if native else "0")
    assert cpu_has_native_bf16() is native
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert compute_dtype("auto") == (torch.bfloat16 if native else torch.float32)  # QLoRA's compute dtype
    assert cpu_capability().endswith("+bf16") is native
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert any("slow" in str(w.message) for w in caught) is not native


def test_capability_switch_unset_reads_the_cpu(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    flags = open("/proc/cpuinfo").read()
    assert cpu_has_native_bf16() is ((" avx512_bf16" in flags) or (" amx_bf16" in flags))
    assert cpu_has_amx() is (" amx_tile" in flags)  # AMX is told apart from AVX512-BF16 alone (AMD Zen 4)
    assert ("+amx" in cpu_capability()) is cpu_has_amx()
