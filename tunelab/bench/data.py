"""The benchmark's bundled instruction dataset: generated from a seed, nothing downloaded.

Real instruction sets (Alpaca, ShareGPT) are long-tailed: most examples are short questions and
rewrites, a few are long explanations or summaries. Padding waste, and so the gain from packing,
depends on that tail, so the generator mixes task kinds to reproduce it: with the SmolLM2 chat
template, most examples are 40-150 tokens and about one in ten is 300-500 tokens. English and
Chinese are mixed (about one in three examples is Chinese).
"""

from __future__ import annotations

import math
import random

import numpy as np

# --- vocabulary --------------------------------------------------------------------------------
CAPITALS = [
    ("France", "Paris", "法国", "巴黎"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Peru", "Lima", "秘鲁", "利马"),
    ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Brazil", "Brasília", "巴西", "巴西利亚"),
    ("India", "New Delhi", "印度", "新德里"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
]
EN_SUBJECTS = [
    "The old bridge",
    "A small bakery",
    "The city council",
    "Our research team",
    "The morning train",
    "A local farmer",
    "The new library",
    "The river",
    "A young engineer",
    "The museum",
    "The school choir",
    "A delivery robot",
    "The mountain village",
    "The weather station",
    "A software update",
]
EN_VERBS = [
    "attracts",
    "changes",
    "supports",
    "replaces",
    "protects",
    "connects",
    "surprises",
    "measures",
    "improves",
    "delays",
    "feeds",
    "welcomes",
    "records",
    "shapes",
]
EN_OBJECTS = [
    "hundreds of visitors",
    "the daily routine of families",
    "the price of fresh bread",
    "the quiet streets",
    "farmers in the valley",
    "students from nearby towns",
    "the traffic on the main road",
    "the flow of clean water",
    "every decision about the budget",
    "the rhythm of the harbour",
    "the old wooden houses",
    "travellers crossing the border",
]
EN_TAILS = [
    "every spring",
    "after heavy rain",
    "during the long winter",
    "on most weekends",
    "since the last election",
    "because costs keep rising",
    "when the festival begins",
    "despite several complaints",
    "thanks to careful planning",
    "more than anyone expected",
]
ZH_SUBJECTS = [
    "那座老桥",
    "一家小面包店",
    "市议会",
    "我们的研究团队",
    "早班火车",
    "一位本地农民",
    "新图书馆",
    "这条河",
    "一位年轻工程师",
    "博物馆",
    "山村",
    "气象站",
    "一次软件更新",
]
ZH_VERBS = ["吸引了", "改变了", "支持着", "取代了", "保护着", "连接着", "影响了", "记录着", "改善了", "推迟了"]
ZH_OBJECTS = [
    "成百上千的游客",
    "家庭的日常生活",
    "新鲜面包的价格",
    "安静的街道",
    "山谷里的农民",
    "附近城镇的学生",
    "主干道上的交通",
    "清洁水的供应",
    "每一项预算决定",
    "港口的节奏",
]
ZH_TAILS = [
    "每年春天",
    "大雨过后",
    "在漫长的冬天里",
    "大多数周末",
    "自从上次选举以来",
    "因为成本不断上涨",
    "节日开始的时候",
    "尽管有不少投诉",
    "多亏了周密的计划",
]
LIST_TOPICS = [
    (
        "fruits",
        "水果",
        ["apple", "banana", "cherry", "mango", "pear", "plum", "grape", "kiwi", "lemon", "peach", "fig", "lime"],
    ),
    (
        "programming languages",
        "编程语言",
        ["Python", "Rust", "Go", "Java", "C", "Haskell", "Ruby", "Kotlin", "Swift", "Lua", "Julia", "OCaml"],
    ),
    (
        "rivers",
        "河流",
        [
            "Nile",
            "Amazon",
            "Yangtze",
            "Danube",
            "Rhine",
            "Volga",
            "Mekong",
            "Thames",
            "Seine",
            "Ganges",
            "Indus",
            "Niger",
        ],
    ),
    (
        "musical instruments",
        "乐器",
        ["piano", "violin", "flute", "drum", "cello", "guitar", "harp", "oboe", "trumpet", "erhu", "pipa", "guzheng"],
    ),
]
LIST_NOTES_EN = [
    "is easy to find",
    "has a long history",
    "is popular in many countries",
    "is often studied",
    "appears in many stories",
    "is worth learning about",
]
LIST_NOTES_ZH = ["很容易找到", "历史悠久", "在许多国家很受欢迎", "经常被研究", "出现在许多故事里", "值得了解"]


def en_sentence(rng: random.Random) -> str:
    return f"{rng.choice(EN_SUBJECTS)} {rng.choice(EN_VERBS)} {rng.choice(EN_OBJECTS)} {rng.choice(EN_TAILS)}."


def zh_sentence(rng: random.Random) -> str:
    return f"{rng.choice(ZH_TAILS)}，{rng.choice(ZH_SUBJECTS)}{rng.choice(ZH_VERBS)}{rng.choice(ZH_OBJECTS)}。"


# --- task kinds: each returns (instruction, response) ----------------------------------------------
def fact_qa(rng: random.Random, zh: bool) -> tuple[str, str]:
    country, capital, country_zh, capital_zh = rng.choice(CAPITALS)
    if zh:
        return f"{country_zh}的首都是哪里？", f"{country_zh}的首都是{capital_zh}。"
    return f"What is the capital of {country}?", f"The capital of {country} is {capital}."


def rewrite(rng: random.Random, zh: bool) -> tuple[str, str]:
    n = rng.choice([1, 1, 2]) if not zh else 1
    if zh:
        text = "".join(zh_sentence(rng) for _ in range(n))
        return f"把下面的句子改写成疑问句：\n{text}", text.replace("。", "吗？")
    text = " ".join(en_sentence(rng) for _ in range(n))
    return f"Rewrite the following text in capital letters:\n{text}", text.upper()


def make_list(rng: random.Random, zh: bool) -> tuple[str, str]:
    name, name_zh, items = rng.choice(LIST_TOPICS)
    picked = rng.sample(items, rng.randint(3, 8))
    if zh:
        lines = [f"{i}. {item}：{rng.choice(LIST_NOTES_ZH)}" for i, item in enumerate(picked, 1)]
        return f"列出{len(picked)}种{name_zh}，并各写一句简短说明。", "\n".join(lines)
    lines = [f"{i}. {item.capitalize()} {rng.choice(LIST_NOTES_EN)}." for i, item in enumerate(picked, 1)]
    return f"List {len(picked)} {name} with a short note on each.", "\n".join(lines)


def summarise(rng: random.Random, zh: bool) -> tuple[str, str]:
    """The long tail: summarise (or explain) a generated paragraph whose length is itself long-tailed."""
    n = min(14, max(4, round(math.exp(rng.gauss(math.log(8), 0.45)))))
    if zh:
        # a Chinese sentence takes about 2.5x the tokens of an English one with this vocabulary
        sentences = [zh_sentence(rng) for _ in range(max(3, round(n * 0.45)))]
        answer = "这段文字主要讲了：" + "".join(sentences[::3]) + "总之，这些变化彼此相关。"
        return "请总结下面这段文字的要点：\n" + "".join(sentences), answer
    sentences = [en_sentence(rng) for _ in range(n)]
    if rng.random() < 0.5:
        answer = "In short: " + " ".join(sentences[::3]) + " These changes are connected."
        return "Summarise the main points of this paragraph:\n" + " ".join(sentences), answer
    answer = "Here is what the paragraph says, point by point:\n" + "\n".join(f"- {s}" for s in sentences)
    return "Explain this paragraph in detail, one point per line:\n" + " ".join(sentences), answer


# kind, share of examples: mostly short, a tail of long ones (like Alpaca / ShareGPT)
TASKS = [(fact_qa, 0.3), (rewrite, 0.28), (make_list, 0.28), (summarise, 0.14)]


def make_bench_rows(n: int, seed: int = 0, zh_share: float = 0.35) -> list[dict]:
    """`n` records in the `messages` format, the same for the same (n, seed)."""
    rng = random.Random(seed)
    kinds, weights = zip(*TASKS)
    rows = []
    for _ in range(n):
        task = rng.choices(kinds, weights)[0]
        instruction, response = task(rng, rng.random() < zh_share)
        rows.append(
            {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]}
        )
    return rows


def length_stats(lengths: list[int]) -> dict:
    """Token-length summary (tokens per example) of the encoded data."""
    a = np.asarray(lengths, dtype=float)
    p10, p50, p90, p99 = np.percentile(a, [10, 50, 90, 99])
    return {
        "examples": len(lengths),
        "mean": float(a.mean()),
        "min": int(a.min()),
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(a.max()),
        "p90_over_p10": float(p90 / p10),
        "share_40_150": float(((a >= 40) & (a <= 150)).mean()),
        "share_over_300": float((a > 300).mean()),
    }
