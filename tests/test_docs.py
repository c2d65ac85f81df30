"""The documentation: every Python snippet of the pages runs as written, and every `samopt` command line of the
pages and the README is one the command line takes.

Each page's snippets run in order in one namespace, which :data:`PRELUDE` (and a page's own
entry in :data:`SETUP`) fills with the names they take as given: a small model with a
BatchNorm layer and a head ``model.fc``, a batch ``x, y``, a ``loader``, a ``closure`` and an
optimizer. ``mkdocs build --strict`` (CI, ``make test``) checks the links and the API pages.
"""

import dataclasses
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

from samopt.train.cli import parse
from samopt.train.config import GlueConfig, TrainConfig, resolve
from samopt.train.loop import validate

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if p.name != "benchmarks.md")
SNIPPET = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)

PRELUDE = """
import torch, torch.nn.functional as F
import samopt

torch.manual_seed(0)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU())
        self.fc = torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(self.body(x))

model = Net()
params = list(model.parameters())
weights = [p for p in params if p.dim() > 1]
biases_and_norms = [p for p in params if p.dim() <= 1]
x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
data = torch.utils.data.TensorDataset(torch.randn(128, 20), torch.randint(0, 3, (128,)))
loader = train_loader = torch.utils.data.DataLoader(data, batch_size=32)
loss_fn = F.cross_entropy
scaler = torch.amp.GradScaler("cpu", enabled=False)

def closure():
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss

opt = samopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
"""

#: What a page's snippets take as given beyond :data:`PRELUDE`.
SETUP = {
    "guides/distributed.md": "import torch.distributed as dist\n"
    "from torch.nn.parallel import DistributedDataParallel\n"
    "dist.init_process_group('gloo', init_method='file://' + str(Path('pg').resolve()), rank=0, world_size=1)\n",
    "guides/glue.md": "import os\nos.chdir(Path(samopt.__file__).parents[1])  # its paths are the repository's\n",
    "guides/hf.md": "import transformers\n"
    "from tests.test_integrations import Pairs, minilm\n"
    "model, train = minilm(), Pairs(n=8)\n"
    "training_args = transformers.TrainingArguments(output_dir='out', max_steps=1, per_device_train_batch_size=4, "
    "use_cpu=True, report_to=[], save_strategy='no', disable_tqdm=True)\n",
    "guides/sharpness.md": "sgd_state = {k: v.clone() for k, v in model.state_dict().items()}\n"
    "sam_state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sgd_state.items()}",
}


def snippets(page: Path) -> list[str]:
    return [textwrap.dedent(code) for _, code in SNIPPET.findall(page.read_text())]


def test_the_pages_hold_snippets():
    counted = {p.relative_to(DOCS).as_posix(): len(snippets(p)) for p in PAGES}
    assert sum(counted.values()) >= 14, counted
    for page in ("methods/sam.md", "methods/sparse-sam.md", "methods/delta-sam.md", "methods/variants.md"):
        assert counted[page] >= 1, page  # each method's page shows it running


@pytest.mark.parametrize("page", [p.relative_to(DOCS).as_posix() for p in PAGES if snippets(p)])
def test_every_snippet_of_the_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"Path": Path}
    try:
        exec(compile(PRELUDE + SETUP.get(page, ""), f"{page} prelude", "exec"), namespace)
        for i, code in enumerate(snippets(DOCS / page)):
            exec(compile(code, f"{page} snippet {i + 1}", "exec"), namespace)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert torch.is_grad_enabled()


def command_lines(page: Path) -> list[list[str]]:
    """The ``samopt`` command lines of a page's shell blocks, as argument lists (after ``samopt``)."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split(";"):
                words = shlex.split(command, comments=True)
                if "samopt" in words and not words[0].startswith(("pip", "make")):
                    lines.append(words[words.index("samopt") + 1 :])
    return lines


def test_every_command_line_of_the_docs_is_one_samopt_takes():
    """Each `samopt ...` line of the README and the docs parses, and its settings resolve and pass the checks a
    run makes before it loads any data, so no page shows a flag, value or combination that samopt refuses."""
    commands = {
        p.relative_to(ROOT).as_posix(): lines for p in [ROOT / "README.md", *PAGES] if (lines := command_lines(p))
    }
    assert sum(map(len, commands.values())) >= 20, commands
    for page, lines in commands.items():
        for argv in lines:
            args = parse(argv)  # a refused line exits with status 2 and its error on stderr
            if args.command not in ("train", "glue", "compare", "glue-compare"):
                continue
            kind = GlueConfig if args.command.startswith("glue") else TrainConfig
            explicit = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(kind)}}
            for optimizer in args.optimizers.split(",") if "compare" in args.command else [None]:
                settings = explicit if optimizer is None else {**explicit, "optimizer": optimizer}
                cfg = resolve(getattr(args, "recipe", None), settings, kind)
                validate(cfg)
                assert cfg.epochs >= 1, (page, argv)
