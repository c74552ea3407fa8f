"""What tunelab agrees to read and where it writes: safetensors only (pickle is an opt-in), custom model
code only with trust_remote_code, damaged weight files are clear errors, run names stay inside out_dir."""

import json
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab.config import build_config, load_config
from tunelab.errors import ConfigError, UserError
from tunelab.methods import get_method
from tunelab.models import load_causal_lm, resolve_model_path

CORRUPT = "corrupted or truncated safetensors file"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def tiny_llama_copy(tmp_path):
    """A writable copy of the tiny-llama model folder (weights, config, tokenizer)."""
    return shutil.copytree(resolve_model_path("tiny-llama"), tmp_path / "model")


def as_pickle(folder, name="pytorch_model.bin"):
    """Replace the folder's safetensors weights by a pickle file holding the same tensors."""
    torch.save(load_file(folder / "model.safetensors"), folder / name)
    (folder / "model.safetensors").unlink()
    return folder


# --- models: pickle weights ----------------------------------------------------------------------


def test_pickle_only_model_is_refused_naming_the_file_and_the_opt_in(tiny_llama_copy):
    as_pickle(tiny_llama_copy)
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*allow_pickle: true"):
        tunelab.load(tiny_llama_copy)
    cfg = build_config({"model": str(tiny_llama_copy)})
    with pytest.raises(UserError, match="pytorch_model.bin"):
        get_method("lora").load_base(cfg, torch.device("cpu"))


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "last.ckpt"])
def test_other_pickle_files_are_named_too(tiny_llama_copy, name):
    as_pickle(tiny_llama_copy, name)
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load_causal_lm(str(tiny_llama_copy))


def test_allow_pickle_loads_the_same_weights_with_a_warning(tiny_llama_copy, capsys):
    reference = load_causal_lm("tiny-llama").eval()
    as_pickle(tiny_llama_copy)
    cfg = build_config({"model": str(tiny_llama_copy), "allow_pickle": True})
    model = get_method("lora").load_base(cfg, torch.device("cpu")).eval()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "pytorch_model.bin" in warnings[0] and "allow_pickle" in warnings[0]
    ids = torch.arange(1, 13).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_safetensors_win_over_pickle_files_next_to_them(tiny_llama_copy):
    torch.save({"not": torch.zeros(1)}, tiny_llama_copy / "pytorch_model.bin")  # would not even fit the model
    load_causal_lm(str(tiny_llama_copy))  # reads model.safetensors, never the pickle


# --- models: custom code -------------------------------------------------------------------------


def with_auto_map(folder, model_type):
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('the custom code ran')\n")
    return folder


def test_custom_code_needs_trust_remote_code(tiny_llama_copy):
    with_auto_map(tiny_llama_copy, "tunelab_custom")
    with pytest.raises(UserError, match=r"needs its own Python code.*modeling_custom\.py.*trust_remote_code: true"):
        tunelab.load(tiny_llama_copy)
    cfg = build_config({"model": str(tiny_llama_copy)})
    with pytest.raises(UserError, match="trust_remote_code: true"):
        get_method("lora").load_base(cfg, torch.device("cpu"))


def test_trusting_custom_code_prints_a_warning(tiny_llama_copy, capsys):
    from tunelab.trust import check_remote_code

    check_remote_code(with_auto_map(tiny_llama_copy, "tunelab_custom"), "custom", trust_remote_code=True)
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "modeling_custom.py" in err and err.count("\n") == 1


def test_auto_map_on_a_known_architecture_loads_without_running_the_code(tiny_llama_copy):
    # transformers has Llama built in: with trust_remote_code false the folder's code is not imported
    tunelab.load(with_auto_map(tiny_llama_copy, "llama"))


# --- adapters: damaged or pickle files -----------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished tiny-llama LoRA run (2 steps, no validation split)."""
    from helpers import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("lora"), val_fraction=0, max_steps=2).run_dir


@pytest.fixture
def run_copy(lora_run, tmp_path):
    return shutil.copytree(lora_run, tmp_path / "run")


def test_truncated_adapter_is_a_clear_error(run_copy):
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    truncate(weights)
    with pytest.raises(UserError) as err:
        tunelab.load(run_copy)
    assert str(err.value).startswith(f"{weights}: {CORRUPT} (")


def test_truncated_adapter_from_the_cli_exits_2(run_copy, tmp_path):
    from helpers import run_cli

    weights = run_copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 16)  # garbage instead of a header
    result = run_cli(["generate", str(run_copy), "--prompt", "hi", "--max-new-tokens", "2"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {weights}: {CORRUPT} ("), result.stderr


def test_truncated_extra_adapter_is_a_clear_error(run_copy, lora_run):
    truncate(run_copy / "adapter" / "adapter_model.safetensors")
    with pytest.raises(UserError, match=CORRUPT):
        tunelab.load(lora_run, adapters={"other": run_copy})


def test_pickle_adapter_needs_allow_pickle(run_copy, capsys):
    adapter = run_copy / "adapter"
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()  # peft alone would now read the pickle
    with pytest.raises(UserError, match=r"adapter_model\.bin.*allow_pickle: true"):
        tunelab.load(run_copy)
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("allow_pickle: false", "allow_pickle: true"))
    tunelab.load(run_copy)
    assert "warning:" in capsys.readouterr().err


def test_missing_adapter_weights_are_named(run_copy):
    (run_copy / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors: missing"):
        tunelab.load(run_copy)


def test_truncated_bottleneck_head_is_a_clear_error(tmp_path):
    from tunelab.methods.adapter import HEAD_FILE, BottleneckAdapterMethod
    from tunelab.models import load_classifier

    method = BottleneckAdapterMethod()
    settings = types.SimpleNamespace(
        adapter=types.SimpleNamespace(kind="houlsby", reduction=4, non_linearity="relu", dropout=0.0)
    )
    method.save(method.apply(load_classifier("tiny-bert", ["a", "b"]), settings), tmp_path)
    truncate(tmp_path / HEAD_FILE)
    with pytest.raises(UserError) as err:
        method.load(load_classifier("tiny-bert", ["a", "b"]), tmp_path, settings)
    assert str(err.value).startswith(f"{tmp_path / HEAD_FILE}: {CORRUPT}")


# --- paths: nothing written outside the run folder -----------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "..", ".", "a/b", "/tmp/abs", "a\\b", "a\x00b", "line\nbreak", ""])
def test_run_name_must_stay_inside_out_dir(name):
    with pytest.raises(ConfigError, match="run_name"):
        build_config({"run_name": name})


def test_run_name_error_names_the_yaml_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: tiny-llama\nrun_name: ../../etc\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{path}:2: run_name: must be a plain folder name"):
        load_config(path)


@pytest.mark.parametrize("name", ["a.b", "../x", ""])
def test_adapter_name_must_be_plain(name):
    with pytest.raises(ConfigError, match="adapter_name"):
        build_config({"adapter_name": name})


def test_run_dir_creation_refuses_an_unvalidated_name(tmp_path):
    from tunelab.training.run_dir import create_run_dir

    cfg = types.SimpleNamespace(out_dir=str(tmp_path / "runs"), run_name="../escape", method="lora", model="m")
    with pytest.raises(UserError, match="run_name"):
        create_run_dir(cfg)
    assert not (tmp_path / "escape").exists()


def test_cli_train_with_an_escaping_run_name_writes_nothing(tmp_path):
    from helpers import run_cli

    (tmp_path / "out").mkdir()
    (tmp_path / "config.yaml").write_text("model: tiny-llama\nout_dir: out\nrun_name: ../escape\n", encoding="utf-8")
    result = run_cli(["train", "config.yaml", "--no-progress"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "config.yaml:3" in result.stderr and "run_name" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out"]
    assert not list((tmp_path / "out").iterdir())
