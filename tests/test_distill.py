"""Knowledge distillation: the KD loss against a direct computation, block removal, tiny distillation runs
(learning, parent, cache, resume) and the errors of a teacher that does not fit."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import interrupted_copy, toy_rows
from tunelab.blocks import keep_blocks
from tunelab.data.collate import pad_batch
from tunelab.distill import distill
from tunelab.distill.loss import block_pairs, classification_kd_sums, kd_terms, lm_kd_sums
from tunelab.errors import ConfigError
from tunelab.models import load_causal_lm, load_classifier

IGNORE = -100


@pytest.fixture(scope="module")
def teacher():
    return load_causal_lm("tiny-llama").eval()


def _lm_batch(n=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        ids = torch.randint(0, 49152, (length - i,), generator=g).tolist()
        labels = [IGNORE] * 5 + ids[5:]  # a prompt without loss, then the completion
        examples.append({"input_ids": ids, "labels": labels})
    return pad_batch(examples, pad_id=0)


def _direct_kd(student_logits, teacher_logits, targets, temperature, alpha):
    """The KD loss written out: alpha T^2 sum p (log p - log q) + (1 - alpha) sum -log softmax(s)[y], in fp64."""
    s, t = student_logits.double(), teacher_logits.double()
    p = torch.softmax(t / temperature, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s / temperature, -1))).sum()
    ce = -torch.log_softmax(s, -1).gather(-1, targets[:, None]).sum()
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def test_lm_kd_loss_and_gradient_equal_a_direct_computation(teacher):
    student = keep_blocks(teacher, [1]).train()
    torch.manual_seed(0)
    with torch.no_grad():  # a student that differs from its teacher more than one block does
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _lm_batch()
    temperature, alpha = 2.0, 0.7
    mask = batch["labels"][:, 1:] != IGNORE
    # several chunks: the chunked, checkpointed path is the one compared
    sums = lm_kd_sums(student, batch, teacher, temperature, alpha, chunk=7)
    sums.total.backward()
    fast_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    direct = _direct_kd(s_logits, t_logits, batch["labels"][:, 1:][mask], temperature, alpha)
    direct.backward()
    # fp32 logits against an fp64 reference: agreement to ~1e-6 relative; 1e-4 leaves room for summation order
    assert float(sums.total.detach()) == pytest.approx(float(direct.detach()), rel=1e-4)
    assert sums.kl_sum > 0 and sums.ce_sum > 0
    for fast, p in zip(fast_grads, student.parameters()):
        torch.testing.assert_close(fast, p.grad, rtol=1e-3, atol=1e-6 * float(p.grad.abs().max()))


def test_kd_on_every_position_equals_a_direct_computation(teacher):
    """distill.kd_positions: all: the KL over every real position whose next token is in the same example
    (padding excluded), the CE over the labels only; value and gradient against full logits in fp64."""
    from tunelab.distill.loss import kd_mask

    student = keep_blocks(teacher, [1]).train()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _lm_batch()  # rows of 12, 11, 10 tokens, right-padded; labels from position 5
    every = kd_mask(batch, every_position=True)
    assert every.sum(1).tolist() == [11, 10, 9]  # each row's real tokens but its last
    sums = lm_kd_sums(student, batch, teacher, 1.5, 0.6, chunk=7, every_position=True)
    sums.total.backward()
    fast_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_all = student(**inputs).logits[:, :-1].double()
    with torch.no_grad():
        t_all = teacher(**inputs).logits[:, :-1].double()
    p = torch.softmax(t_all[every] / 1.5, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s_all[every] / 1.5, -1))).sum()
    labels = batch["labels"][:, 1:]
    ce = -torch.log_softmax(s_all[labels != IGNORE], -1).gather(-1, labels[labels != IGNORE][:, None]).sum()
    direct = 0.6 * 1.5**2 * kl + 0.4 * ce
    direct.backward()
    assert float(sums.total.detach()) == pytest.approx(float(direct.detach()), rel=1e-4)
    assert sums.ce_sum == pytest.approx(float(ce.detach()), rel=1e-4)
    for fast, p in zip(fast_grads, student.parameters()):
        torch.testing.assert_close(fast, p.grad, rtol=1e-3, atol=1e-6 * float(p.grad.abs().max()))
    # a packed row: no position predicts the first token of the next example
    packed = {"labels": torch.zeros(1, 6, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}
    assert kd_mask(packed, every_position=True).tolist() == [[True, True, False, True, True]]


def test_block_pairs_match_each_kept_block_with_the_boundary_it_stands_for():
    # 30 blocks, every 2nd kept: student block j (teacher block 2j) also does teacher block 2j + 1's work
    pairs = block_pairs(30, 2)
    assert pairs[:2] == [(1, 2), (2, 4)] and pairs[-2:] == [(14, 28), (15, 30)] and len(pairs) == 15
    assert block_pairs(7, 3) == [(1, 3), (2, 6), (3, 7)]  # blocks 0, 3, 6; the last also stands for nothing
    assert block_pairs(2, 1) == [(1, 1), (2, 2)]


def test_the_hidden_state_term_equals_a_direct_cosine_distance_and_trains_the_student(teacher):
    """distill.hidden_weight: beta x sum over label positions of the mean (over block boundaries) of
    1 - cos(student, teacher), from transformers' hidden_states; a student equal to its teacher is at 0."""
    batch = _lm_batch()
    mask = batch["labels"][:, 1:] != IGNORE
    same = keep_blocks(teacher, [0, 1])
    with torch.no_grad():
        assert lm_kd_sums(same, batch, teacher, 2.0, 0.5, hidden_weight=1.0, pairs=block_pairs(2, 1)).hidden_sum < 1e-4
    student = keep_blocks(teacher, [0, 1]).train()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = block_pairs(2, 1)
    plain = lm_kd_sums(student, batch, teacher, 2.0, 0.5)
    with_hidden = lm_kd_sums(student, batch, teacher, 2.0, 0.5, hidden_weight=0.3, pairs=pairs)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_h = student.model(**inputs, output_hidden_states=True).hidden_states
    with torch.no_grad():
        t_h = teacher.model(**inputs, output_hidden_states=True).hidden_states
    direct = sum(
        sum(1 - F.cosine_similarity(s_h[i][:, :-1][mask].double(), t_h[j][:, :-1][mask].double(), dim=-1))
        for i, j in pairs
    ) / len(pairs)
    direct = float(direct.detach().sum())
    assert with_hidden.hidden_sum == pytest.approx(direct, rel=1e-4) and with_hidden.hidden_sum > 0
    assert float((with_hidden.total - plain.total).detach()) == pytest.approx(0.3 * direct, rel=1e-4)
    with_hidden.total.backward()
    assert float(student.model.layers[0].mlp.down_proj.weight.grad.abs().max()) > 0


def test_the_hidden_state_term_needs_a_cut_student_and_a_live_teacher(tiny_config):
    from tunelab.config import build_config

    for distill_section, why in (
        ({"teacher": "tiny-llama", "hidden_weight": 1.0}, "needs distill.keep_every"),
        ({"teacher": "tiny-llama", "keep_every": 2, "cache": True, "hidden_weight": 1.0}, "distill.cache: false"),
    ):
        cfg = {k: v for k, v in tiny_config.items() if k != "model"} | {"distill": distill_section}
        with pytest.raises(ConfigError, match=f"distill.hidden_weight: .*{why}"):
            build_config(cfg)


def test_alpha_zero_is_cross_entropy_and_top_k_of_every_logit_is_the_full_teacher():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 50, generator=g), 3 * torch.randn(6, 50, generator=g)
    y = torch.randint(0, 50, (6,), generator=g)
    kl_full, ce = kd_terms(s, t, y, 4.0)
    kl_top, _ = kd_terms(s, tuple(t.topk(50, dim=-1)), y, 4.0)  # all 50 logits, in another order
    assert float(kl_top) == pytest.approx(float(kl_full), rel=1e-5)
    assert float(ce) == pytest.approx(float(F.cross_entropy(s, y, reduction="sum")), rel=1e-6)
    assert float(_direct_kd(s, t, y, 4.0, 0.0)) == pytest.approx(float(ce), rel=1e-6)
    kl_few, _ = kd_terms(s, tuple(t.topk(5, dim=-1)), y, 4.0)
    assert float(kl_few) != pytest.approx(float(kl_full), rel=1e-3)  # a real truncation changes it


def test_classification_kd_loss_equals_a_direct_computation():
    labels = ["a", "b", "c"]
    torch.manual_seed(0)
    student = load_classifier("tiny-bert", labels, pad_token_id=0)
    torch.manual_seed(1)
    teacher_model = load_classifier("tiny-bert", labels, pad_token_id=0).eval()
    examples = [{"input_ids": [101, 7 + i, 2000 + i, 102], "label": i % 3} for i in range(4)]
    batch = pad_batch(examples, 0)
    sums = classification_kd_sums(student, batch, teacher_model, 3.0, 0.6)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    direct = _direct_kd(s, t, batch["labels"], 3.0, 0.6)
    assert float(sums.total.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)


def test_keep_blocks_copies_the_kept_blocks_and_the_kv_cache_follows(teacher):
    student = keep_blocks(teacher, [1])
    assert len(teacher.model.layers) == 2 and teacher.config.num_hidden_layers == 2  # the teacher is unchanged
    assert student.config.num_hidden_layers == 1 and student.model.layers[0].self_attn.layer_idx == 0
    for (name, p), q in zip(
        student.model.layers[0].state_dict().items(), teacher.model.layers[1].state_dict().values()
    ):
        assert torch.equal(p, q), name
        assert p.data_ptr() != q.data_ptr()  # copied, not shared
    ids = torch.tensor([[1, 200, 300, 400]])
    cached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    fresh = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, fresh)
    whole = keep_blocks(teacher, [0, 1])
    torch.testing.assert_close(whole(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="out of range"):
        keep_blocks(teacher, [2])


def _config(tmp_path, rows=None, **distill_options):
    tmp_path.mkdir(exist_ok=True)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows or toy_rows()), encoding="utf-8")
    return {
        "method": "full",
        "out_dir": str(tmp_path / "runs"),
        "run_name": "kd",
        "data": {"train": str(data), "val_fraction": 0.2, "max_length": 64},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-3, "precision": "fp32", "save_every": 4},
        "distill": {"teacher": "tiny-llama", "keep_every": 2} | distill_options,
    }


def test_a_distilled_half_depth_student_learns_names_its_parent_and_resumes(tmp_path):
    from tunelab.runs import list_runs
    from tunelab.training import train

    result = distill(_config(tmp_path))
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    s = result.summary
    assert s["parent"] == "tiny-llama"
    assert s["distill"]["student"]["total_params"] < s["distill"]["teacher"]["total_params"]
    assert {"eval_loss", "eval_forward_tokens_per_s"} <= set(s["distill"]["teacher"])
    assert s["distill"]["student"]["eval_loss"] == pytest.approx(s["eval"]["eval_loss"])
    assert [r["parent"] for r in list_runs(tmp_path / "runs")] == ["tiny-llama"]
    assert load_causal_lm(s["model"]).config.num_hidden_layers == 1
    # an ordinary run: resumed from its checkpoint it ends where the uninterrupted run did
    copy = interrupted_copy(result.run_dir, tmp_path / "runs" / "kd-copy", last_step=8)
    resumed = train(None, resume=copy, progress=False)
    assert resumed.summary["final_train_loss"] == pytest.approx(s["final_train_loss"], rel=1e-5)
    assert resumed.summary["parent"] == "tiny-llama"


def test_a_cache_of_every_teacher_logit_trains_as_the_teacher_forward_does(tmp_path):
    rows = toy_rows(10)
    live = distill(_config(tmp_path / "live", rows) | {"train": {"max_steps": 2, "batch_size": 4, "precision": "fp32"}})
    cached = distill(
        _config(tmp_path / "cached", rows, cache=True, top_k=49152, cache_chunk=3)
        | {"train": {"max_steps": 2, "batch_size": 4, "precision": "fp32"}}
    )
    assert len(list((cached.run_dir / "teacher-logits").glob("chunk-*.safetensors"))) == 3  # 8 examples, 3 a file

    def metrics(run):
        return [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(metrics(live), metrics(cached), strict=True):
        # the same numbers summed in another order (full softmax vs a permuted top-k of every logit)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["kd_kl"] == pytest.approx(a["kd_kl"], rel=1e-3)


def test_a_teacher_with_another_vocabulary_is_a_config_error_naming_both(tmp_path):
    cfg = _config(tmp_path) | {"model": "tiny-llama", "distill": {"teacher": "tiny-bert"}}
    with pytest.raises(ConfigError, match=r"teacher 'tiny-bert' and the student 'tiny-llama' have different vocab"):
        distill(cfg)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_distill_config_errors(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(ConfigError, match="keep_every builds the student from the teacher"):
        distill(cfg | {"model": "tiny-llama"})
    with pytest.raises(ConfigError, match="needs a `distill` section"):
        distill({k: v for k, v in cfg.items() if k != "distill"})
    with pytest.raises(ConfigError, match="distill.teacher"):
        distill(cfg | {"distill": {"alpha": 0.5}})
    with pytest.raises(ConfigError, match="distillation is for task: causal_lm or classification"):
        distill(cfg | {"task": "preference"})
    with pytest.raises(ConfigError, match=r"distill.alpha"):
        distill(cfg | {"distill": {"teacher": "tiny-llama", "alpha": 1.5}})


def test_the_teacher_answers_prompts_without_answers_and_they_join_the_training_set(tmp_path):
    """distill.prompts: the teacher's greedy answers (the same as generating them directly), written once and
    added to the training examples only; an answer the records had is not used."""
    from tunelab.config import load_config
    from tunelab.data import prepare_data
    from tunelab.distill.answers import answers_path
    from tunelab.generation import GenerationSettings, generate_batch
    from tunelab.loading import load

    prompts = tmp_path / "prompts.jsonl"
    records = [{"messages": [{"role": "user", "content": f"Repeat the word: w{i}"}]} for i in range(5)]
    records.append({"instruction": "Repeat the word: x", "output": "an answer that is dropped"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = _config(tmp_path, prompts=str(prompts), answer_tokens=4)
    cfg["train"] |= {"max_steps": 2}
    result = distill(cfg)

    model, tok = load("tiny-llama")
    settings = GenerationSettings.greedy(4)
    expected = [generate_batch(model, tok, [r["messages"][0]["content"]], settings)[0] for r in records[:5]]
    expected.append(generate_batch(model, tok, ["Repeat the word: x"], settings)[0])
    saved = load_config(result.run_dir / "config.yaml", saved_run=True)
    path = answers_path(saved)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == [a for a in expected if a.strip()]
    assert len(rows) >= 4 and all(r["messages"][-1]["content"] != "an answer that is dropped" for r in rows)

    with_answers = prepare_data(saved, tok)
    without = prepare_data(load_config(result.run_dir / "config.yaml", ["distill.prompts=null"], saved_run=True), tok)
    assert len(with_answers.train) == len(without.train) + len(rows)
    assert [e["input_ids"] for e in with_answers.val] == [e["input_ids"] for e in without.val]
    # written once: another run of the same teacher and prompts reads the file back
    mtime = path.stat().st_mtime_ns
    distill(cfg | {"run_name": "kd-again"})
    assert path.stat().st_mtime_ns == mtime


def test_prompts_must_end_with_a_user_turn(tmp_path):
    from tunelab.errors import DataError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"}]}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:1: a prompt must end with a user turn"):
        distill(_config(tmp_path, prompts=str(prompts)))
