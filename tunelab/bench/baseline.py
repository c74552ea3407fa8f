"""The baseline the benchmark measures against: what most people run today.

transformers `Trainer` + peft LoRA, fp32, `DataCollatorForSeq2Seq(padding="longest")` (labels padded
with -100), default Trainer settings apart from the ones the comparison fixes (batch, LR, schedule,
clipping, steps, seed). It gets tunelab's encoded examples already in tunelab's shuffled order, through a
sequential sampler, so both phases train on the same batches.
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from ..models import load_tokenizer, resolve_model_path
from ..reproducible import seed_everything
from .steps import StepLog, adapter_checksum


class OrderedTrainer(Trainer):
    """The stock Trainer, except that it keeps the dataset's order and records each step's batches."""

    def __init__(self, *args, step_log: StepLog, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_log = step_log

    def _get_train_sampler(self, train_dataset=None):
        # the examples arrive pre-ordered (tunelab's shuffle); a random sampler would reorder them
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        useful, slots = int(inputs["attention_mask"].sum()), int(inputs["input_ids"].numel())
        t0 = time.perf_counter()
        self._forward_s = 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the micro-batch loss is already divided by the window's loss tokens (num_items_in_batch),
        # so a step's loss is the sum over its micro-batches
        self.step_log.add_micro(float(loss), useful, slots)
        # training_step = compute_loss (the forward) + backward
        self.step_log.add_time("backward", time.perf_counter() - t0 - self._forward_s)
        self.step_log.micro_end = time.perf_counter()
        return loss

    def compute_loss(self, *args, **kwargs):
        t0 = time.perf_counter()
        with self.step_log.section("forward"):
            out = super().compute_loss(*args, **kwargs)
        self._forward_s += time.perf_counter() - t0
        return out


class StepTimes(TrainerCallback):
    """Marks the start of training and the end of every optimizer step for the step log."""

    def __init__(self, step_log: StepLog):
        self.step_log = step_log

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_log.begin()

    def on_step_end(self, args, state, control, **kwargs):
        # after the last backward: clipping, optimizer and scheduler steps, zeroing the gradients
        self.step_log.add_time("optimizer", time.perf_counter() - self.step_log.micro_end)
        self.step_log.end()


class ExampleList(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def train_baseline(spec: dict, step_log: StepLog):
    """Train the baseline for spec['steps'] steps on the examples in spec['order']; returns the trained model."""
    tokenizer = load_tokenizer(spec["model"])
    tokenizer.padding_side = "right"  # training pads on the right (labels and positions line up with tunelab's)
    seed_everything(spec["seed"])  # the same RNG state as tunelab's loop before the model and LoRA init
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec["model"]), dtype=torch.float32)
    from peft import LoraConfig, get_peft_model

    lora = spec["lora"]
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            bias="none",
        ),
    )
    step_log.init_checksum = adapter_checksum(model)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(dir=spec["workdir"], prefix="hf-"),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=spec["steps"],
        seed=spec["seed"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,  # our own progress lines instead of a bar
    )
    trainer = OrderedTrainer(
        model=model,
        args=args,
        train_dataset=ExampleList([spec["examples"][i] for i in spec["order"]]),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
        callbacks=[StepTimes(step_log)],
        step_log=step_log,
    )
    step_log.notes["optim"] = str(args.optim)
    step_log.notes["loss_normalised_by_window_tokens"] = bool(trainer.model_accepts_loss_kwargs)
    step_log.mark_train_start()
    t0 = time.perf_counter()
    trainer.train()
    step_log.notes["train_wall_s"] = time.perf_counter() - t0
    return trainer.model
