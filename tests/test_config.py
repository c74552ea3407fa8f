"""Config: defaults, YAML, dotted overrides, and errors that name the key and suggest a fix."""

from pathlib import Path

import pytest
import yaml

from tunelab.config import SECTION_USERS, Config, apply_overrides, build_config, load_config, parse_override
from tunelab.errors import ConfigError
from tunelab.yamlio import read_yaml


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(*args, **kwargs)
    return str(err.value)


def test_defaults():
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.model == "smollm2-135m-instruct"
    assert cfg.method == "lora"
    assert cfg.out_dir == "runs"
    assert cfg.data.val_fraction == 0.1
    assert cfg.data.format == "auto"
    assert cfg.data.loss_on == "completion"
    assert cfg.train.log_every == 1
    assert cfg.train.scheduler == "cosine"
    assert cfg == Config()


def test_yaml_loading(tmp_path):
    path = write(
        tmp_path,
        """\
model: tiny-llama
method: lora
seed: 3
data:
  train: train.jsonl
  max_length: 128
  format: alpaca
train:
  lr: 1.0e-3
  epochs: 2
  scheduler: linear
lora:
  r: 8
  target_modules: [q_proj, v_proj]
""",
    )
    (tmp_path / "train.jsonl").write_text("{}\n")
    cfg = load_config(path)
    assert cfg.model == "tiny-llama" and cfg.seed == 3
    assert cfg.data.max_length == 128 and cfg.data.format == "alpaca"
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 2.0 and cfg.train.scheduler == "linear"
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.alpha == 32  # untouched keys keep their defaults
    # a relative data path is relative to the config file's folder
    assert cfg.data.train == str(tmp_path / "train.jsonl")


def test_empty_yaml_and_bom(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    cfg = load_config(write(tmp_path, "\ufeffseed: 5\n"))
    assert cfg.seed == 5


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "train.packing=true",
            "lora.target_modules=[q_proj,k_proj]",
            "train.batch_size=4",
            "lora.dropout=0.1",
            "train.max_steps=10",
            "data.eval=null",
        ],
    )
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-4
    assert cfg.train.packing is True
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int)
    assert cfg.lora.dropout == 0.1
    assert cfg.train.max_steps == 10
    assert cfg.data.eval is None


def test_parse_override():
    assert parse_override("train.batch_size=4") == ("train.batch_size", 4)
    assert parse_override("train.packing=false") == ("train.packing", False)
    assert parse_override("lora.target_modules=[q_proj, k_proj]") == ("lora.target_modules", ["q_proj", "k_proj"])
    assert parse_override("data.system_prompt=a=b") == ("data.system_prompt", "a=b")  # split on the first '='
    assert parse_override("run_name=") == ("run_name", None)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")


def test_overrides_win_over_yaml(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.01\n  batch_size: 2\n")
    cfg = load_config(path, ["train.lr=0.5"])
    assert cfg.train.lr == 0.5 and cfg.train.batch_size == 2


def test_override_creates_nested_keys():
    data = apply_overrides({}, ["lora.r=4", "train.lr_groups.lm_head=0.5", "data.train=x.jsonl"])
    assert data == {"lora": {"r": 4}, "train": {"lr_groups": {"lm_head": 0.5}}, "data": {"train": "x.jsonl"}}
    cfg = build_config(data)
    assert cfg.lora.r == 4 and cfg.train.lr_groups == {"lm_head": 0.5}
    # a scalar in the way is replaced by a mapping
    assert apply_overrides({"train": 3}, ["train.lr=0.1"]) == {"train": {"lr": 0.1}}


def test_numeric_value_for_a_string_key():
    # YAML reads `run_name: 2024` as an int; it is still a fine run name
    cfg = load_config(None, ["run_name=2024"])
    assert cfg.run_name == "2024"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,closest",
    [
        ("learning_rate", "lr"),
        ("lrr", "lr"),
        ("batchsize", "batch_size"),
        ("epoch", "epochs"),
        ("num_train_epochs", "epochs"),
    ],
)
def test_unknown_train_key_suggests_closest(tmp_path, key, closest):
    path = write(tmp_path, f"model: tiny-llama\ntrain:\n  epochs: 1\n  {key}: 1\n")
    message = config_error(path)
    assert f"unknown key 'train.{key}'" in message
    assert f"did you mean '{closest}'" in message
    assert f"{path}:4" in message  # the YAML line of the key


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "method: lora\nmodle: tiny-llama\n")
    message = config_error(path)
    assert "unknown key 'modle'" in message and "did you mean 'model'" in message
    assert f"{path}:2" in message


def test_unknown_key_from_override():
    message = config_error(None, ["lora.rank=4"])
    assert "unknown key 'lora.rank'" in message and "did you mean 'r'" in message
    message = config_error(None, ["data.fromat=alpaca"])
    assert "unknown key 'data.fromat'" in message and "did you mean 'format'" in message


def test_unknown_section_key_without_close_match(tmp_path):
    message = config_error(None, ["zzzzzz=1"])
    assert "unknown key 'zzzzzz'" in message


# every invalid value is caught at validation: (dotted key, bad value as YAML text)
BAD_VALUES = [
    ("train.lr", "-1.0e-4"),
    ("train.lr", "0"),
    ("train.lr", ".inf"),
    ("train.lr", ".nan"),
    ("train.epochs", "0"),
    ("train.epochs", "-1"),
    ("train.epochs", "abc"),
    ("train.max_steps", "0"),
    ("train.batch_size", "0"),
    ("train.grad_accum", "0"),
    ("train.warmup_ratio", "-0.1"),
    ("train.warmup_ratio", "1.5"),
    ("train.weight_decay", "-0.01"),
    ("train.max_grad_norm", "0"),
    ("train.save_total_limit", "0"),
    ("train.save_every", "0"),
    ("train.eval_every", "0"),
    ("train.log_every", "0"),
    ("train.early_stopping_patience", "0"),
    ("train.scheduler", "exponential"),
    ("train.precision", "fp8"),
    ("train.lr_groups", "{lm_head: -1}"),
    ("lora.r", "0"),
    ("lora.r", "-4"),
    ("lora.alpha", "-16"),
    ("lora.alpha", "0"),
    ("lora.dropout", "1"),
    ("lora.dropout", "1.5"),
    ("lora.dropout", "-0.1"),
    ("lora.lr_ratio", "0"),
    ("lora.rank_pattern", "{q_proj: 0}"),
    ("lora.alpha_pattern", "{q_proj: -2}"),
    ("lora.init", "svd"),
    ("data.max_length", "4"),
    ("data.val_fraction", "1"),
    ("data.val_fraction", "-0.1"),
    ("data.format", "parquet"),
    ("data.loss_on", "prompt"),
    ("data.labels", "[a, b, a]"),
    ("adapter.reduction", "0"),
    ("adapter.dropout", "1"),
    ("adapter.kind", "lora"),
    ("prefix.num_virtual_tokens", "0"),
    ("prompt.num_virtual_tokens", "-1"),
    ("ptuning.encoder_hidden_size", "0"),
    ("adalora.init_r", "0"),
    ("adalora.target_r", "16"),
    ("adalora.tfinal_ratio", "0.95"),
    ("freeze.trainable_layers", "-1"),
    ("freeze.trainable_layers", "[]"),
    ("quant.bits", "3"),
    ("eval.max_new_tokens", "0"),
    ("eval.max_examples", "0"),
    ("eval.scorer", "not-a-function"),
    ("method", "lorra"),
    ("task", "regression"),
    ("run_name", "../outside"),
    ("run_name", "a/b"),
    ("out_dir", "''"),
    ("adapter_name", "a.b"),
    ("seed", "abc"),
    ("trust_remote_code", "maybe"),
    ("allow_pickle", "maybe"),
]


def _method_reading(dotted: str) -> str:
    """A method whose config may hold the key's section (lora for the common sections)."""
    return SECTION_USERS.get(dotted.split(".")[0], ["lora"])[0]


def _nested_yaml(dotted: str, value: str) -> str:
    """`a.b: v` as nested YAML; the bad key always lands on the last line."""
    parts = dotted.split(".")
    return (
        "model: tiny-llama\n"
        + (f"method: {_method_reading(dotted)}\n" if "." in dotted else "")
        + "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(parts[:-1]))
        + f"{'  ' * (len(parts) - 1)}{parts[-1]}: {value}\n"
    )


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_values_name_the_key(key, value):
    message = config_error(None, [f"method={_method_reading(key)}", f"{key}={value}"])
    assert f"command line {f'{key}={value}'!r}: {key}: " in message


def test_an_override_is_blamed_for_its_own_error_in_one_line(tmp_path):
    path = write(tmp_path, "model: tiny-llama\ntrain:\n  batch_size: 4\nlora:\n  r: 8\n")
    assert config_error(path, ["train.batch_size=0"]) == (
        "invalid config: command line 'train.batch_size=0': train.batch_size: "
        "Input should be greater than or equal to 1 (got 0)"
    )  # was: the YAML's line 3, on a second line
    assert config_error(path, ["train.batch_sise=2"]).startswith("invalid config: command line 'train.batch_sise=2'")
    assert config_error(path, ["lora={r: 0}"]).startswith("invalid config: command line 'lora={r: 0}': lora.r:")
    assert config_error(path, ["train.lr=0"]).startswith("invalid config: command line 'train.lr=0': train.lr:")
    bad = write(tmp_path, "model: tiny-llama\ntrain:\n  batch_size: 0\n")  # two problems: a line each, each its place
    assert config_error(bad, ["lora.r=0"]).splitlines()[1:] == [
        f"  {bad}:3: train.batch_size: Input should be greater than or equal to 1 (got 0)",
        "  command line 'lora.r=0': lora.r: Input should be greater than or equal to 1 (got 0)",
    ]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_values_in_yaml_name_the_key_and_line(tmp_path, key, value):
    text = _nested_yaml(key, value)
    path = write(tmp_path, text)
    message = config_error(path)
    assert f"{path}:{text.count(chr(10))}: {key}: " in message


def test_cross_field_defaults_are_checked_too():
    # the default target_r (8) is above an init_r of 4: caught though target_r was never written
    assert "adalora.target_r" in config_error(None, ["method=adalora", "adalora.init_r=4"])
    assert "adalora.tfinal_ratio" in config_error(None, ["method=adalora", "adalora.tinit_ratio=0.9"])


def test_valid_edge_values_pass():
    cfg = load_config(
        None,
        [
            "train.warmup_ratio=0",
            "data.val_fraction=0",
            "method=freeze",
            "data.max_length=8",
            "freeze.trainable_layers=0",
            "freeze.trainable_layers=[-1, '*norm*']",
            "run_name=日期-v1.2",
            "adapter_name=dates_v2",
            "eval.scorer=my_pkg.scores:exact",
            "allow_pickle=true",
        ],
    )
    assert cfg.run_name == "日期-v1.2" and cfg.allow_pickle and cfg.freeze.trainable_layers == [-1, "*norm*"]
    assert load_config(None, ["lora.dropout=0"]).lora.dropout == 0
    assert load_config(None, ["method=adalora", "adalora.init_r=8"]).adalora.target_r == 8


def test_each_method_owns_its_sections(tmp_path):
    """A method's sections exist with their defaults; another method's section is an error naming the line
    and the methods it is for; the saved config holds only the sections the run reads."""
    cfg = load_config(None, ["method=ia3"])
    assert cfg.ia3 is not None and cfg.lora is None and cfg.adapter is None
    assert set(cfg.to_dict()) & set(SECTION_USERS) == {"ia3"}
    assert {"lora", "quant"} <= set(load_config(None, ["method=qlora"]).to_dict())
    path = write(tmp_path, "model: tiny-llama\nmethod: ia3\nlora:\n  r: 8\n")
    message = config_error(path)
    assert (
        f"{path}:3: method 'ia3' does not read the 'lora' section" in message and "'lora' is for lora, qlora" in message
    )
    # the two silent ones: prefix has no init_text (prompt's option), adalora reads its own keys
    assert "unknown key 'prefix.init_text'" in config_error(None, ["method=prefix", "prefix.init_text=hi"])
    assert "does not read the 'lora' section" in config_error(None, ["method=adalora", "lora.alpha=8"])
    assert load_config(None, ["method=adalora", "adalora.alpha=8"]).adalora.alpha == 8
    # a section left empty (`lora:` with no keys) is no section at all
    assert load_config(write(tmp_path, "method: ia3\nlora:\n")).lora is None


def test_a_saved_run_of_an_older_version_with_every_section_still_loads(tmp_path):
    """Older runs saved every method's section; those the run's method does not read are dropped."""
    sections = {name: {} for name in SECTION_USERS}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "method": "prefix", **sections}))
    with pytest.raises(ConfigError):
        load_config(path)
    cfg = load_config(path, saved_run=True)
    assert cfg.prefix.num_virtual_tokens == 20 and cfg.lora is None
    # an older version's field in another method's section (the demo run of 0.x saved prefix.init_text) never applied
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "method": "lora", "prefix": {"init_text": None}}))
    assert load_config(path, saved_run=True).prefix is None


def test_bad_value_in_yaml_names_key_and_line(tmp_path):
    path = write(tmp_path, "model: tiny-llama\nlora:\n  alpha: 16\n  r: 0\n")
    message = config_error(path)
    assert "lora.r" in message and f"{path}:4" in message


def test_unknown_method_suggests_closest():
    message = config_error(None, ["method=lorra"])
    assert "method" in message and "did you mean 'lora'" in message


def test_unknown_choice_values_suggest_closest():
    message = config_error(None, ["train.scheduler=cosin"])
    assert "train.scheduler" in message and "did you mean 'cosine'" in message
    message = config_error(None, ["data.format=alpacca"])
    assert "data.format" in message and "did you mean 'alpaca'" in message
    message = config_error(None, ["train.scheduler=exponential"])
    assert "train.scheduler" in message and "'cosine'" in message  # lists the valid choices


def test_several_errors_reported_together():
    message = config_error(None, ["train.lrr=1", "lora.r=0"])
    assert "train.lrr" in message and "lora.r" in message


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "model: tiny-llama\ntrain:\n  lr: [1\n  epochs: 2\n")
    message = config_error(path)
    assert str(path) in message and "invalid YAML" in message


def test_lone_surrogates_and_self_referring_aliases_are_config_errors(tmp_path):
    """Both reached pydantic (UnicodeEncodeError while quoting the value) or a recursive walk (RecursionError)."""
    message = config_error(write(tmp_path, 'model: tiny-llama\nmethod: "\\ud800"\n'))
    assert f"{tmp_path / 'config.yaml'}:2: method: not text" in message
    assert "lone surrogate" in config_error(None, ["train.scheduler=\udcff"])
    for text in ("train: &x {lr: *x}\n", "lora:\n  target_modules: &x [q_proj, *x]\n"):
        assert "refers to a mapping or list that contains it" in config_error(write(tmp_path, text))
    assert read_yaml("a: &x {b: [1]}\nc: [*x, *x]\n") == {"a": {"b": [1]}, "c": [{"b": [1]}] * 2}  # shared: fine


def test_config_not_a_mapping_and_missing_file(tmp_path):
    assert "mapping" in config_error(write(tmp_path, "- a\n- b\n"))
    assert "not found" in config_error(tmp_path / "missing.yaml")


# --- round trip -----------------------------------------------------------------------------------


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(
        None,
        [
            "model=tiny-llama",
            "train.lr=3e-4",
            "lora.target_modules=[q_proj,v_proj]",
            "train.lr_groups.lm_head=0.1",
            "data.system_prompt=你是一个助手。",
            "run_name=rt",
            "train.packing=true",
            "data.val_fraction=0",
        ],
    )
    path = write(tmp_path, cfg.to_yaml(), "resolved.yaml")
    again = load_config(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.hash() == cfg.hash()
    assert "你是一个助手。" in path.read_text(encoding="utf-8")


def test_hash_ignores_run_name_and_out_dir():
    a = load_config(None, ["run_name=a", "out_dir=x"])
    b = load_config(None, ["run_name=b", "out_dir=y"])
    c = load_config(None, ["train.lr=0.1"])
    assert a.hash() == b.hash() != c.hash()


def test_shipped_example_and_demo_configs_validate():
    from pathlib import Path

    from tunelab.demo.run import demo_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples" / "alpaca-lora.yaml")
    assert Path(cfg.data.train).is_file()
    assert demo_config(root / "examples" / "data" / "tiny-alpaca.jsonl", "runs").train.max_steps == 40


def test_readme_config_reference_is_generated_from_the_fields():
    """The README's reference is the generator's output (regenerate: python -m tunelab.config_reference
    --write README.md); every option of every section is documented."""
    from tunelab.config import SECTIONS, CommonConfig
    from tunelab.config_reference import BEGIN, END, markdown, section_rows

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block.strip() == markdown().strip(), (
        "README.md is stale: python -m tunelab.config_reference --write README.md"
    )
    for model in [CommonConfig, *SECTIONS.values()]:
        for key, _, _, text in section_rows(model):
            assert text, f"{model.__name__}.{key} has no description"
    assert "`lora.r`" in block and "`adalora.alpha`" in block and "read by `lora`, `qlora`" in block
