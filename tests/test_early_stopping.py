"""Early stopping on a plateau restores the best step (scripted eval sequence, tiny model)."""

import json

import torch

from tunelab.config import build_config
from tunelab.training.checkpoint import trainable_state
from tunelab.training.loop import Trainer


def test_early_stopping_stops_on_plateau_and_restores_the_best_step(tiny_config, monkeypatch):
    tiny_config["train"].update(max_steps=50, eval_every=2, early_stopping_patience=2)
    trainer = Trainer(build_config(tiny_config), progress=False)
    scripted = iter([3.0, 2.0, 1.0, 1.5, 1.2, 0.5, 0.4])  # best at the 3rd eval (step 6), then 2 worse ones
    snapshots = {}

    def fake_eval():
        step = trainer.state["step"]
        snapshots[step] = trainable_state(trainer.model)
        return {"eval_loss": next(scripted, 9.0)}

    monkeypatch.setattr(trainer, "evaluate", fake_eval)
    result = trainer.run()
    assert result.summary["steps"] == 10  # evals at 2,4,6,8,10: 8 and 10 did not improve on step 6
    assert result.summary["best_step"] == 6
    for name, tensor in snapshots[6].items():
        assert torch.equal(dict(trainer.model.named_parameters())[name].detach(), tensor), name
    evals = [
        r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r
    ]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10]


def test_best_weights_survive_a_resume(tiny_config, monkeypatch):
    import tunelab
    from helpers import interrupted_copy

    # scripted by step (the same in both runs, on every CPU): the best is step 2, before the resume point
    scripted = {2: 1.0, 4: 2.0, 6: 3.0}
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"eval_loss": scripted[self.state["step"]]})
    tiny_config["train"].update(max_steps=6, eval_every=2, save_every=2)
    full = tunelab.train(tiny_config, progress=False)
    assert full.summary["best_step"] == 2
    run = interrupted_copy(full.run_dir, full.run_dir.parent / "resumed", last_step=6)
    resumed = tunelab.train(None, resume=run, progress=False)
    assert resumed.summary["best_step"] == 2
    from safetensors.torch import load_file

    a, b = (
        load_file(full.run_dir / "adapter" / "adapter_model.safetensors"),
        load_file(run / "adapter" / "adapter_model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the best step's weights are not the last step's, so the resumed run had to restore them from its checkpoint
    ckpt = full.run_dir / "checkpoints" / "step-6"
    best, last = load_file(ckpt / "best.safetensors"), load_file(ckpt / "trainable.safetensors")
    assert any(not torch.equal(best[k], last[k]) for k in last)


def test_the_final_evaluation_is_the_one_already_made_of_the_same_weights(tiny_config, monkeypatch):
    """No evaluation is repeated at the end: the summary's is the last step's, or the restored best step's,
    and evaluating the final weights anew gives exactly those numbers."""
    tiny_config["train"].update(max_steps=4, eval_every=2)
    for shift in (-10.0, 10.0):  # step 4 scored better (kept) or worse (step 2 restored) than it is
        trainer = Trainer(build_config(tiny_config | {"run_name": f"final{shift:+g}"}), progress=False)
        real, calls = trainer.evaluate, []

        def shifted(real=real, calls=calls, trainer=trainer, shift=shift):
            calls.append(trainer.state["step"])
            out = real()
            out["eval_loss"] += shift if trainer.state["step"] == 4 else 0.0
            return out

        monkeypatch.setattr(trainer, "evaluate", shifted)
        result = trainer.run()
        best = 4 if shift < 0 else 2
        assert calls == [2, 4]
        assert result.summary["best_step"] == best == result.summary["eval"]["step"]
        assert real()["eval_loss"] + (shift if best == 4 else 0.0) == result.summary["eval"]["eval_loss"]
