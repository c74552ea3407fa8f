"""A seeded medical-triage classification task: short patient complaints (English and Chinese) -> department.

Each complaint is a template x a symptom phrase x a duration / age, so the department is learnable from the
symptom words while the exact sentences vary. A new classification head on the base encoder is at chance;
a short LoRA run (query/value + head) on `minilm-l6` learns it. `run_triage_benchmark` measures both.
"""

from __future__ import annotations

import random
import time
from importlib import resources
from pathlib import Path

from ..io import atomic_write_jsonl

LABELS = ["cardiology", "neurology", "dermatology", "gastroenterology", "respiratory"]

SYMPTOMS_EN = {
    "cardiology": [
        "chest pain when climbing stairs",
        "a racing heartbeat",
        "palpitations at night",
        "tightness in my chest",
        "an irregular heartbeat",
        "swollen ankles and chest pressure",
        "chest pain spreading to my left arm",
        "my heart skipping beats",
        "high blood pressure and chest discomfort",
        "fainting with a pounding heart",
    ],
    "neurology": [
        "severe headaches",
        "numbness in my left hand",
        "dizziness and blurred vision",
        "a migraine with flashing lights",
        "tingling in my feet",
        "memory problems",
        "trembling hands",
        "seizures",
        "weakness on one side of my face",
        "trouble speaking clearly",
    ],
    "dermatology": [
        "an itchy rash on my arms",
        "red patches of skin",
        "a mole that changed colour",
        "acne that will not heal",
        "dry, peeling skin",
        "hives after eating",
        "a blistering rash",
        "eczema on my hands",
        "a skin lesion that bleeds",
        "hair falling out in patches",
    ],
    "gastroenterology": [
        "stomach pain after meals",
        "diarrhea",
        "heartburn and acid reflux",
        "nausea and vomiting",
        "blood in my stool",
        "bloating and constipation",
        "pain in my upper abdomen",
        "difficulty swallowing food",
        "yellow eyes and dark urine",
        "cramps in my belly",
    ],
    "respiratory": [
        "a persistent cough",
        "shortness of breath",
        "wheezing at night",
        "coughing up phlegm",
        "trouble breathing when I walk",
        "a chest cold that will not clear",
        "an asthma attack",
        "a dry cough and fever",
        "noisy breathing",
        "coughing up blood",
    ],
}

# Chinese symptom -> the English term a bilingual triage note puts beside it. minilm-l6's vocabulary
# (bert-base-uncased) holds only ~240 CJK characters, so most Chinese symptom words tokenize to [UNK]:
# without the gloss the Chinese complaints are not learnable by this model (measured: ~40% accuracy on
# them vs 100% on English). `make_triage(..., zh_gloss=False)` writes pure Chinese for multilingual models.
SYMPTOMS_ZH = {
    "cardiology": [
        ("胸口疼", "chest pain"),
        ("心跳很快", "racing heart"),
        ("心慌心悸", "palpitations"),
        ("胸闷", "chest tightness"),
        ("心律不齐", "arrhythmia"),
        ("血压高", "hypertension"),
        ("心脏漏跳", "skipped heartbeats"),
        ("胸痛放射到左臂", "chest pain to left arm"),
    ],
    "neurology": [
        ("头痛得厉害", "severe headache"),
        ("左手发麻", "hand numbness"),
        ("头晕眼花", "dizziness"),
        ("偏头痛", "migraine"),
        ("脚底刺痛", "tingling feet"),
        ("记忆力下降", "memory loss"),
        ("手抖", "tremor"),
        ("抽搐", "seizures"),
    ],
    "dermatology": [
        ("手臂起了痒疹", "itchy rash"),
        ("皮肤发红起斑", "red skin patches"),
        ("痣变了颜色", "changing mole"),
        ("痘痘一直不好", "acne"),
        ("皮肤干燥脱皮", "peeling skin"),
        ("起荨麻疹", "hives"),
        ("手上长湿疹", "eczema"),
        ("皮肤起水泡", "skin blisters"),
    ],
    "gastroenterology": [
        ("吃完饭胃疼", "stomach pain"),
        ("拉肚子", "diarrhea"),
        ("烧心反酸", "acid reflux"),
        ("恶心呕吐", "nausea and vomiting"),
        ("便血", "blood in stool"),
        ("肚子胀还便秘", "constipation"),
        ("上腹部疼", "abdominal pain"),
        ("吞咽困难", "difficulty swallowing"),
    ],
    "respiratory": [
        ("一直咳嗽", "persistent cough"),
        ("喘不上气", "shortness of breath"),
        ("晚上喘鸣", "wheezing"),
        ("咳痰", "coughing up phlegm"),
        ("走路就呼吸困难", "breathlessness"),
        ("感冒一直不好还咳", "lingering cough"),
        ("哮喘发作", "asthma attack"),
        ("干咳发烧", "dry cough and fever"),
    ],
}

DURATIONS_EN = [
    "two days",
    "three days",
    "a week",
    "ten days",
    "two weeks",
    "a month",
    "several months",
    "about a year",
]
ONSETS_EN = [
    "yesterday",
    "this morning",
    "last night",
    "two days ago",
    "a week ago",
    "two weeks ago",
    "a month ago",
    "last year",
]
DURATIONS_ZH = ["两天", "三天", "一个星期", "十天", "两个星期", "一个月", "几个月", "半年", "一年"]

TEMPLATES_EN = [
    "I have had {s} for {d}.",
    "{a}-year-old patient reports {s}, duration {d}.",
    "Patient, age {a}, complains of {s} ({d}).",
    "My {rel} has {s} and it has lasted {d}.",
    "For {d} I have been dealing with {s}; I am {a}.",
    "Hello doctor, I am worried about {s}. It started {ago}.",
    "Walk-in: {s}, onset {ago}, age {a}.",
    "Can I book a visit? I have had {s} for {d}.",
]
RELATIVES_EN = ["father", "mother", "son", "daughter", "husband", "wife", "grandmother", "grandfather"]

TEMPLATES_ZH = [
    "我{s}已经{d}了。",
    "患者{a}岁，主诉{s}，持续{d}。",
    "医生您好，我最近{s}，大概有{d}了。",
    "我{rel}{s}，已经{d}。",
    "{a}岁，{s}{d}，想挂号。",
    "这{d}一直{s}，怎么办？",
]
RELATIVES_ZH = ["爸爸", "妈妈", "儿子", "女儿", "丈夫", "妻子", "奶奶", "爷爷"]


def _complaint(rng: random.Random, label: str, chinese: bool, zh_gloss: bool = True) -> str:
    age = rng.randint(4, 90)
    if chinese:
        zh, en = rng.choice(SYMPTOMS_ZH[label])
        return rng.choice(TEMPLATES_ZH).format(
            s=f"{zh}（{en}）" if zh_gloss else zh, d=rng.choice(DURATIONS_ZH), a=age, rel=rng.choice(RELATIVES_ZH)
        )
    text = rng.choice(TEMPLATES_EN).format(
        s=rng.choice(SYMPTOMS_EN[label]),
        d=rng.choice(DURATIONS_EN),
        ago=rng.choice(ONSETS_EN),
        a=age,
        rel=rng.choice(RELATIVES_EN),
    )
    return text[0].upper() + text[1:]


def make_triage(
    n: int, seed: int, chinese_share: float = 0.3, exclude: set | None = None, zh_gloss: bool = True
) -> list[dict]:
    """n distinct complaints {text, label}, labels cycled (balanced); texts in `exclude` are never used.

    About `chinese_share` of them are Chinese; with `zh_gloss` the Chinese symptom carries its English term.
    """
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"could not generate {n} distinct triage complaints")
        label = LABELS[len(rows) % len(LABELS)]
        text = _complaint(rng, label, rng.random() < chinese_share, zh_gloss)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def write_triage(folder, n_train: int = 400, n_test: int = 200, seed: int = 7) -> tuple[Path, Path]:
    """Write triage-train.jsonl / triage-test.jsonl; no test sentence appears verbatim in training."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    test = make_triage(n_test, seed + 1)
    train = make_triage(n_train, seed, exclude={r["text"] for r in test})
    atomic_write_jsonl(folder / "triage-train.jsonl", train)
    atomic_write_jsonl(folder / "triage-test.jsonl", test)
    return folder / "triage-train.jsonl", folder / "triage-test.jsonl"


def triage_config(train_path, test_path, out_dir, overrides: list[str] | None = None):
    """The packaged triage.yaml with the data paths and output folder filled in."""
    import yaml

    from ..config import apply_overrides, build_config

    data = yaml.safe_load(resources.files("tunelab.demo").joinpath("triage.yaml").read_text(encoding="utf-8"))
    data["data"]["train"] = str(train_path)
    data["data"]["eval"] = str(test_path)
    data["out_dir"] = str(out_dir)
    return build_config(apply_overrides(data, overrides or []))


def run_triage_benchmark(out_dir, overrides: list[str] | None = None, seed: int = 7) -> dict:
    """Macro-F1 / accuracy on the 200 held-out complaints before (new seeded head) and after the LoRA run."""
    from ..training.loop import Trainer

    t_start = time.time()
    out_dir = Path(out_dir)
    train_path, test_path = write_triage(out_dir / "triage-data", seed=seed)
    cfg = triage_config(train_path, test_path, out_dir, overrides)
    trainer = Trainer(cfg, progress=False)
    trainer.model.eval()
    before = trainer.evaluate()
    trainer.model.train()
    t_train = time.time()
    result = trainer.run()
    train_wall = time.time() - t_train
    after = result.summary["eval"]
    report = {
        "macro_f1_before": float(before["eval_f1_macro"]),
        "accuracy_before": float(before["eval_accuracy"]),
        "macro_f1_after": float(after["eval_f1_macro"]),
        "accuracy_after": float(after["eval_accuracy"]),
        "auc_after": float(after["eval_auc"]) if after.get("eval_auc") is not None else None,
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "steps": int(result.summary.get("steps", trainer.state["step"])),
        "run_dir": str(result.run_dir),
    }
    print(
        f"triage: {cfg.model} + {cfg.method} ({', '.join(cfg.lora.target_modules or [])}), "
        f"{report['steps']} steps, {len(trainer.data.val)} held-out complaints"
    )
    print(f"{'':10}{'macro-F1':>10}{'accuracy':>10}")
    print(f"{'before':10}{report['macro_f1_before']:>10.3f}{report['accuracy_before']:>10.3f}")
    print(f"{'after':10}{report['macro_f1_after']:>10.3f}{report['accuracy_after']:>10.3f}")
    auc = f"{report['auc_after']:.3f}" if report["auc_after"] is not None else "n/a"
    print(f"AUC after {auc}; training {report['train_wall_s']}s, total {report['total_wall_s']}s")
    return report
