"""Smoke tests of benchmarks/vs_monodepth2.py: the instructions without a checkout, and a tiny run
of our side only (no Monodepth2 here; no timing asserted)."""

from __future__ import annotations

from pathlib import Path

TINY = ["--data", "random", "--height", "32", "--width", "64", "--batch-size", "1", "--threads", "1"]


def test_without_a_checkout_prints_how_to_get_one_and_exits_0(run_benchmark) -> None:
    out = run_benchmark("vs_monodepth2.py", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "git clone https://github.com/nianticlabs/monodepth2" in out.stdout


def test_ours_only_tiny_run_prints_our_three_rows_then_each_trainers_memory_alone(run_benchmark) -> None:
    out = run_benchmark("vs_monodepth2.py", "--ours-only", *TINY, "--steps", "1", "--warmup", "0",
                        "--set", "train.channels_last=true", "--memory")
    assert out.returncode == 0, out.stderr
    assert "ours with train.channels_last=true" in out.stdout  # a switch under test is named in the header
    timing, memory = out.stdout.split("peak RSS, each trainer alone")
    rows = [line.split()[:2] for line in timing.splitlines()]
    assert [["ours", "U"], ["ours", "S"], ["ours", "S+U"]] == [r for r in rows if r[:1] == ["ours"]], out.stdout
    peak = {" ".join(line.split()[:2]): float(line.split()[2]) for line in memory.splitlines()[1:]
            if line.startswith("ours")}
    assert list(peak) == ["ours U", "ours S", "ours S+U"], out.stdout
    # a process that imported torch and built a trainer holds well over 100 MiB; S+U holds both branches
    assert all(mib > 100 for mib in peak.values()), peak
    assert peak["ours S+U"] > peak["ours S"], peak


STAND_IN = {
    # a stand-in with Monodepth2's interface (written for this test; no Monodepth2 code): what the
    # benchmark calls, and what its run-time shims are for (a legacy positional torchvision
    # `pretrained`, PIL.Image.ANTIALIAS, tensorboardX)
    "utils.py": "def readlines(path):\n    with open(path) as f:\n        return f.read().splitlines()\n",
    "options.py": (
        "import argparse\n"
        "class MonodepthOptions:\n"
        "    def __init__(self):\n"
        "        p = self.parser = argparse.ArgumentParser()\n"
        "        for name in ('data_path', 'log_dir', 'model_name', 'weights_init'):\n"
        "            p.add_argument('--' + name)\n"
        "        for name in ('height', 'width', 'batch_size', 'num_layers', 'num_workers'):\n"
        "            p.add_argument('--' + name, type=int)\n"
        "        p.add_argument('--scales', nargs='+', type=int)\n"
        "        p.add_argument('--frame_ids', nargs='+', type=int)\n"
        "        p.add_argument('--split', default='eigen_zhou')\n"
        "        p.add_argument('--png', action='store_true')\n"
        "        p.add_argument('--no_cuda', action='store_true')\n"
    ),
    "networks/__init__.py": (
        "import torch\nimport torchvision.models as models\n"
        "class ResnetEncoder(torch.nn.Module):\n"
        "    def __init__(self, num_layers, pretrained):\n"
        "        super().__init__()\n"
        "        self.encoder = models.resnet18(pretrained)\n"
        "    def forward(self, x):\n"
        "        return self.encoder.conv1(x)\n"
    ),
    "trainer.py": (
        "import os\nimport PIL.Image\nimport torch\nfrom tensorboardX import SummaryWriter\n"
        "from utils import *\nimport networks\n"
        "class Trainer:\n"
        "    def __init__(self, options):\n"
        "        self.opt = options\n"
        "        self.device = torch.device('cpu' if options.no_cuda else 'cuda')\n"
        "        fpath = os.path.join(os.path.dirname(__file__), 'splits', options.split, '{}_files.txt')\n"
        "        self.filenames = readlines(fpath.format('train'))\n"
        "        assert self.filenames[0].split()[1:] == ['1', 'l'], self.filenames[0]\n"
        "        self.interp = PIL.Image.ANTIALIAS\n"
        "        self.models = {'encoder': networks.ResnetEncoder(18, options.weights_init == 'pretrained')}\n"
        "        self.model_optimizer = torch.optim.Adam(self.models['encoder'].parameters(), 1e-4)\n"
        "        self.writer = SummaryWriter(os.path.join(options.log_dir, 'train'))\n"
        "    def set_train(self):\n"
        "        for m in self.models.values():\n"
        "            m.train()\n"
        "    def process_batch(self, inputs):\n"
        "        for key, ipt in inputs.items():\n"
        "            inputs[key] = ipt.to(self.device)\n"
        "        assert inputs[('K', 3)].shape[-2:] == (4, 4) and ('color', -1, 3) in inputs\n"
        "        features = self.models['encoder'](inputs['color_aug', 0, 0])\n"
        "        return {}, {'loss': features.mean()}\n"
    ),
}


def test_tiny_run_against_a_stand_in_checkout_prints_ratios(run_benchmark, tmp_path: Path) -> None:
    for name, text in STAND_IN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    out = run_benchmark("vs_monodepth2.py", "--monodepth2", str(tmp_path), *TINY, "--steps", "1", "--warmup", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith("ours") else ""): line.split()
            for line in out.stdout.splitlines() if line.startswith(("Monodepth2", "ours"))}
    assert set(rows) == {"Monodepth2", "ours U", "ours S", "ours S+U"}, out.stdout
    assert rows["Monodepth2"][-1] == "-" and float(rows["ours S+U"][-1]) > 0, out.stdout
    assert not any(tmp_path.glob("splits")), "the benchmark must not write into the checkout"
