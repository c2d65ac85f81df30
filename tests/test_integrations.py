"""samopt inside Hugging Face's Trainer and Lightning: the same weights as the plain samopt loop on the same batches.

On the CPU (CI) these run in fp32 and bf16. ``SAMOPT_TEST_DEVICE=cuda pytest tests/test_integrations.py``
runs them on a GPU, where fp16 with the frameworks' own GradScaler is added (CPU autocast has no fp16
GradScaler path in either framework); ``docs/benchmarks.md`` records such a run.
"""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import samopt
from samopt.integrations.hf import SAMTrainer
from samopt.train.glue import model_path, read_split

GLUE = Path(__file__).resolve().parent / "data" / "glue"  # real GLUE dev files, see its README
DEVICE = torch.device(os.environ.get("SAMOPT_TEST_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"
MIXED = ("bf16", "fp16") if CUDA else ("bf16",)  # fp16 needs a GradScaler, which the frameworks use on CUDA only


def rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state(DEVICE) if CUDA else None


def set_rng_state(state):
    torch.set_rng_state(state[0])
    if CUDA:
        torch.cuda.set_rng_state(state[1], DEVICE)


def autocast(precision):
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(DEVICE.type, dtype=dtype, enabled=precision != "fp32")


def grad_scaler(precision):
    """The scaler both frameworks make for fp16: GradScaler's defaults (initial scale 2**16)."""
    return torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16")


class Pairs(torch.utils.data.Dataset):
    """The first ``n`` MRPC dev pairs, tokenised to a fixed length."""

    def __init__(self, n: int = 16, length: int = 32) -> None:
        split = read_split("mrpc", GLUE / "MRPC", "dev")
        tok = transformers.AutoTokenizer.from_pretrained(model_path("all-MiniLM-L6-v2"))
        a, b = zip(*split.texts[:n], strict=True)
        self.enc = tok(list(a), list(b), truncation=True, max_length=length, padding="max_length", return_tensors="pt")
        self.labels = split.labels[:n]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def minilm() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(model_path("all-MiniLM-L6-v2"), num_labels=2)


class Recording(SAMTrainer):
    """Remembers every micro-batch and the RNG state before the first one."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not hasattr(self, "seen"):
            self.seen, self.rng = [], rng_state()
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def args(tmp_path, **changes):
    base = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.5,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not CUDA,
        "disable_tqdm": True,
        "seed": 0,
    }
    return transformers.TrainingArguments(**{**base, **changes})


def sam(model, **kw):
    return samopt.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4, weight_decay=0.01, **kw)


def sam_sgd(model, **kw):
    return samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-2, **kw)


# fp32: equal to 1e-6 after two AdamW steps. bf16/fp16: AdamW's first steps (about lr * sign(g)) turn rounding
# differences in near-zero gradients into lr-sized ones, so the mixed-precision runs use SGD, where the weights
# agree to 2e-6 of a 1.6e-3 move (rounding: accelerate's autocast wraps model.forward, the plain loop the loss).
@pytest.mark.parametrize("precision, make, atol", [("fp32", sam, 1e-6)] + [(p, sam_sgd, 1e-5) for p in MIXED])
def test_trainer_with_accumulation_and_clipping_equals_the_plain_samopt_loop(tmp_path, precision, make, atol):
    model = minilm()
    reference = copy.deepcopy(model).to(DEVICE)
    settings = args(tmp_path, bf16=precision == "bf16", fp16=precision == "fp16")
    trainer = Recording(model=model, args=settings, train_dataset=Pairs(), optimizers=(make(model), None))
    trainer.train()
    assert len(trainer.seen) == 4  # 2 updates x 2 micro-batches
    # the plain loop: the closure runs both micro-batches of a window, SAM clips the gradient at w + e
    opt = make(reference, max_grad_norm=0.5)
    scaler = grad_scaler(precision)
    reference.train()
    set_rng_state(trainer.rng)  # the same dropout masks, drawn in the same order
    for window in (trainer.seen[:2], trainer.seen[2:]):

        def closure(window=window):
            total = 0.0
            for inputs in window:
                with autocast(precision):
                    loss = reference(**inputs).loss / 2
                scaler.scale(loss).backward()
                total += loss.detach()
            return total

        opt.step(closure, scaler=scaler)
        scaler.update()
    if precision == "fp16":
        assert scaler.get_scale() == trainer.accelerator.scaler.get_scale() == 2.0**16  # no overflow, no skip
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=atol, rtol=0), name
    initial = minilm().to(DEVICE).parameters()
    moved = max(float((a - b).abs().max().detach()) for a, b in zip(model.parameters(), initial, strict=True))
    assert moved > 100 * atol  # it trained, by far more than the tolerance


def delta(model, **kw):
    return samopt.DeltaSAM(model.parameters(), torch.optim.AdamW, rho=0.05, seed=0, lr=1e-4, weight_decay=0.01, **kw)


def delta_sgd(model, **kw):
    return samopt.DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, seed=0, lr=1e-2, **kw)


@pytest.mark.parametrize("precision, make, atol", [("fp32", delta, 1e-6)] + [(p, delta_sgd, 1e-5) for p in MIXED])
def test_trainer_runs_delta_sam_over_each_accumulation_window(tmp_path, precision, make, atol):
    model = minilm()
    reference = copy.deepcopy(model).to(DEVICE)
    settings = args(tmp_path, logging_steps=1, bf16=precision == "bf16", fp16=precision == "fp16")
    trainer = Recording(model=model, args=settings, train_dataset=Pairs(), optimizers=(make(model), None))
    trainer.train()
    opt = make(reference, max_grad_norm=0.5)  # probes with the same seed, the window as one batch
    scaler = grad_scaler(precision)
    reference.train()
    set_rng_state(trainer.rng)
    losses = []
    for window in (trainer.seen[:2], trainer.seen[2:]):

        def closure(window=window):
            parts = []
            for batch in window:
                with autocast(precision):
                    logits = reference(**{k: v for k, v in batch.items() if k != "labels"}).logits
                parts.append((F.cross_entropy(logits.float(), batch["labels"], reduction="none"), logits))
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        losses.append(float(opt.step(closure, scaler=scaler)))
        scaler.update()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=atol, rtol=0), name
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert logged == pytest.approx(losses, rel=1e-4)  # the window's mean loss, as for any optimizer


def test_trainer_refuses_other_optimizers(tmp_path):
    model = minilm()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = SAMTrainer(
        model=model, args=args(tmp_path, max_steps=1), train_dataset=Pairs(8), optimizers=(plain, None)
    )
    with pytest.raises(TypeError, match=r"SAMTrainer needs a samopt\.SAM optimizer"):
        trainer.train()
    opt = sam(model, max_grad_norm=2.0)
    trainer = SAMTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=Pairs(8), optimizers=(opt, None))
    with pytest.raises(
        ValueError, match=r"max_grad_norm is set twice: 2\.0 on the optimizer and 0\.5 in TrainingArguments"
    ):
        trainer.train()


def test_trainer_checkpoint_resume_keeps_the_sparse_mask_and_optimizer_state(tmp_path):
    def trainer(out, model):
        mask = samopt.masks.DynamicSparseMask(0.5, total_steps=4, update_interval=1, seed=0)
        opt = sam(model, mask=mask)
        settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
        return SAMTrainer(model=model, args=args(out, **settings), train_dataset=Pairs(), optimizers=(opt, None))

    whole = minilm()
    trainer(tmp_path / "a", whole).train()
    resumed = minilm()
    t = trainer(tmp_path / "b", resumed)
    t.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["samopt"]["mask"] is not None and saved["state"]  # masks and AdamW moments are in the checkpoint
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert t.optimizer.optimizer.mask.state_dict()["steps"] == 4


# ------------------------------------------------------------------ Lightning

import lightning  # noqa: E402

from samopt.integrations.lightning import SAMModule  # noqa: E402


def mlp_with_bn_and_dropout(p: float = 0.2) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Dropout(p),
        torch.nn.Linear(32, 3),
    )


class Classifier(SAMModule):
    def __init__(self, net, accumulate=2, mask=None):
        super().__init__(accumulate_grad_batches=accumulate)
        self.net, self.mask, self.seen = net, mask, []

    def sam_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        if not self.seen:
            self.rng = rng_state()
        self.seen.append(batch)
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = samopt.SAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, mask=self.mask)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader():
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(48, 10, generator=g), torch.randint(0, 3, (48,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)  # 6 batches: 3 updates per epoch


PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}  # Lightning's names


def lightning_trainer(tmp_path, **kw):
    settings = {
        "max_epochs": 1,
        "accelerator": "gpu" if CUDA else "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    return lightning.Trainer(**{**settings, **kw})


def fit(module, tmp_path, precision="fp32", **kw):
    trainer = lightning_trainer(tmp_path, precision=PRECISION[precision], **kw)
    trainer.fit(module, loader())
    return trainer


@pytest.mark.parametrize("precision", ["fp32", *MIXED])
def test_lightning_module_equals_the_plain_samopt_loop(tmp_path, precision):
    module = Classifier(mlp_with_bn_and_dropout())
    trainer = fit(module, tmp_path, precision)
    assert trainer.global_step == 3 and len(module.seen) == 6
    net = mlp_with_bn_and_dropout().to(DEVICE)
    opt = samopt.SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = grad_scaler(precision)
    net.train()
    set_rng_state(module.rng)
    for w in range(3):
        window = module.seen[2 * w : 2 * w + 2]

        def closure(window=window):
            for x, y in window:
                with autocast(precision):
                    loss = F.cross_entropy(net(x), y) / 2
                scaler.scale(loss).backward()
            return loss

        opt.step(closure, scaler=scaler)
        scaler.update()
        sched.step()
    if precision == "fp16":
        assert scaler.get_scale() == trainer.precision_plugin.scaler.get_scale() == 2.0**16  # no overflow
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)  # weights and BN statistics
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_lightning_checkpoint_resume(tmp_path):
    # no dropout: Lightning's checkpoints do not hold the global RNG, so dropout masks would differ after a resume
    whole = Classifier(mlp_with_bn_and_dropout(0.0), mask=samopt.masks.RandomMask(0.5, seed=0))
    fit(whole, tmp_path / "a", max_epochs=2)
    first = Classifier(mlp_with_bn_and_dropout(0.0), mask=samopt.masks.RandomMask(0.5, seed=0))
    trainer = fit(first, tmp_path / "b", max_epochs=1)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed = Classifier(mlp_with_bn_and_dropout(0.0), mask=samopt.masks.RandomMask(0.5, seed=0))
    lightning_trainer(tmp_path / "c", max_epochs=2).fit(resumed, loader(), ckpt_path=str(tmp_path / "one.ckpt"))
    for a, b in zip(whole.net.state_dict().values(), resumed.net.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)


class DeltaClassifier(Classifier):
    def sam_per_example_loss(self, batch):
        x, y = batch
        logits = self.net(x)
        return F.cross_entropy(logits, y, reduction="none"), logits

    def configure_optimizers(self):
        return samopt.DeltaSAM(self.parameters(), torch.optim.SGD, rho=0.1, seed=0, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("precision", ["fp32", *MIXED])
def test_lightning_delta_sam_equals_the_plain_loop(tmp_path, precision):
    module = DeltaClassifier(mlp_with_bn_and_dropout())
    trainer = fit(module, tmp_path, precision)
    assert trainer.global_step == 3
    net = mlp_with_bn_and_dropout().to(DEVICE)
    opt = samopt.DeltaSAM(net.parameters(), torch.optim.SGD, rho=0.1, seed=0, lr=0.1, momentum=0.9)
    scaler = grad_scaler(precision)
    net.train()
    set_rng_state(module.rng)
    for w in range(3):
        window = module.seen[2 * w : 2 * w + 2]

        def closure(window=window):
            parts = []
            for x, y in window:
                with autocast(precision):
                    logits = net(x)
                    parts.append((F.cross_entropy(logits, y, reduction="none"), logits))
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        opt.step(closure, scaler=scaler)
        scaler.update()
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)


def test_trainer_with_a_fisher_mask_over_named_inputs(tmp_path):
    model = minilm()
    data = Pairs(8)
    fisher_data = [({k: v[:4] for k, v in data.enc.items()}, data.labels[:4])]  # Hugging Face keyword inputs
    opt = samopt.SSAMF(
        model.parameters(),
        torch.optim.AdamW,
        model=model,
        fisher_data=fisher_data,
        loss_fn=F.cross_entropy,
        rho=0.05,
        sparsity=0.5,
        num_samples=4,
        update_interval=1,
        lr=1e-4,
    )
    SAMTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=data, optimizers=(opt, None)).train()
    assert opt.mask_density() == pytest.approx(0.5, abs=1e-6) and opt.mask.position == 4


class MiniLMModule(SAMModule):
    def __init__(self, model):
        super().__init__(accumulate_grad_batches=2)
        self.model, self.seen = model, []

    def sam_loss(self, batch):
        if not self.seen:
            self.rng = rng_state()
        if len(self.seen) < 4:
            self.seen.append(batch)
        return self.model(**batch).loss

    def configure_optimizers(self):
        return sam(self.model)


def test_lightning_on_the_packaged_minilm_equals_the_plain_loop(tmp_path):
    model = minilm().train()  # from_pretrained returns eval mode, which Lightning (>= 2.2) leaves as it is
    reference = copy.deepcopy(model)
    module = MiniLMModule(model)
    data = torch.utils.data.DataLoader(Pairs(8), batch_size=4)  # one update of 2 accumulated batches
    lightning_trainer(tmp_path).fit(module, data)
    reference.to(DEVICE)
    opt = sam(reference)
    reference.train()
    set_rng_state(module.rng)
    window = module.seen[:2]  # sam_loss saw the two batches at w, then again at w + e

    def closure():
        total = 0.0
        for batch in window:
            loss = reference(**batch).loss / 2
            loss.backward()
            total += loss.detach()
        return total

    opt.step(closure)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
