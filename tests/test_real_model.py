"""A short real-model run on smollm2-135m-instruct (the packaged GGUF, cached as safetensors)."""

import json

import torch

import tunelab
from tunelab.demo.dates import write_dataset
from tunelab.generation import GenerationSettings, generate_batch


def test_smollm2_lora_run_trains_saves_and_reloads(tmp_path):
    train_path, _ = write_dataset(tmp_path / "data", n_train=24, n_test=4)
    cfg = {
        "model": "smollm2-135m-instruct",
        "out_dir": str(tmp_path / "runs"),
        "run_name": "smol",
        "data": {"train": str(train_path), "val_fraction": 0.25, "max_length": 96},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 2e-3, "precision": "fp32"},
        "lora": {"target_modules": "all-linear", "dropout": 0.0},
    }
    result = tunelab.train(cfg, progress=False)
    losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    assert result.summary["total_params"] > 100_000_000
    config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert "smollm2-135m-instruct" in config["base_model_name_or_path"]

    model, tok = tunelab.load(result.run_dir)
    ids = tok("2021年3月3日", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base, atol=1e-4)  # the adapter is applied
    out = generate_batch(
        model,
        tok,
        ["Convert the date to ISO 8601 format (YYYY-MM-DD).\n\nMarch 3, 2021"],
        GenerationSettings(max_new_tokens=12, temperature=0),
    )
    assert isinstance(out[0], str) and out[0]
