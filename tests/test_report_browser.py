"""The evaluation HTML report in a real headless Chromium (Debian's ``chromium``; ``.ci/setup-browser.sh``
installs it with a CJK font): the DOM holds the base and tuned answers and the metrics, a screenshot is saved, and
Chinese text renders as glyphs, not missing-glyph boxes."""

import html
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kubetune.report import FONT_STACK, render_report
from kubetune.tiny import TINY_NOTE

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: run .ci/setup-browser.sh (Debian chromium + CJK font)"
)

METRICS = {
    "base_eval_loss": 2.3125, "tuned_eval_loss": 1.4375, "loss_reduction": 0.875,
    "base_perplexity": 10.1, "tuned_perplexity": 4.21,
    "base_chrf": 12.5, "tuned_chrf": 31.25, "chrf_gain": 18.75,
    "eval_rows": 40,
}
ROWS = [
    {"kind": "probe", "prompt": "久咳不愈怎么治疗？", "base_answer": "多喝热水，注意休息。",
     "tuned_answer": "久咳不愈多属肺脾气虚，治宜补肺健脾、止咳化痰，可用六君子汤加减。"},
    {"kind": "probe", "prompt": "How should a persistent cough be treated in Traditional Chinese Medicine?",
     "base_answer": "<think>hmm</think> Drink water.",
     "tuned_answer": "Differentiate the pattern first: lung-spleen qi deficiency calls for Liu Jun Zi Tang."},
    {"kind": "held-out", "prompt": "### Instruction:\n失眠多梦怎么调理？\n### Response:\n",
     "reference": "心脾两虚者宜归脾汤。", "base_answer": "早点睡觉。", "tuned_answer": "心脾两虚，宜用归脾汤益气补血、健脾养心。",
     "base_chrf": "3.1", "tuned_chrf": "27.4"},
]
WINDOW = (1280, 1800)


def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium once with a throw-away profile; returns stdout."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        "--force-device-scale-factor=1", f"--user-data-dir={profile}", *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def screenshot(tmp_path: Path, page: Path, png: Path, size: tuple[int, int] = WINDOW):
    from PIL import Image

    # The virtual-time budget lets the page (and a srcdoc iframe) finish painting before the capture.
    chromium(tmp_path, f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=5000",
             page.as_uri())
    assert png.is_file() and png.stat().st_size > 0
    return Image.open(png).convert("L")


class Tree(HTMLParser):
    """Text of every element with an id or class, enough to find answers and metric cells in the DOM."""

    def __init__(self):
        super().__init__()
        self.stack: list[dict] = []
        self.elements: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag in {"meta", "link", "br", "img", "input", "hr"}:
            return
        element = {"tag": tag, **dict(attrs), "text": ""}
        self.stack.append(element)
        self.elements.append(element)

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for element in self.stack:
            element["text"] += data

    def by_class(self, name: str) -> list[str]:
        return [e["text"] for e in self.elements if name in e.get("class", "").split()]

    def by_id(self, name: str) -> str:
        (text,) = [e["text"] for e in self.elements if e.get("id") == name]
        return text


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    page = render_report("kubetune: base vs tuned (中医助手)", METRICS, ROWS,
                         {"base model": "DeepSeek-R1-Distill-Qwen-7B", "数据集": "tcm-demo"}, notes=[TINY_NOTE])
    path.write_text(page, encoding="utf-8")
    return path


def test_dom_has_base_and_tuned_answers_and_metrics(report, tmp_path):
    dom = chromium(tmp_path, "--dump-dom", report.as_uri())
    tree = Tree()
    tree.feed(dom)
    base = [" ".join(t.split()) for t in tree.by_class("base-answer")]
    tuned = [" ".join(t.split()) for t in tree.by_class("tuned-answer")]
    assert len(base) == len(tuned) == len(ROWS)
    for row in ROWS:
        assert any(row["base_answer"] in text for text in base), row["base_answer"]
        assert any(row["tuned_answer"] in text for text in tuned), row["tuned_answer"]
    # A model's "<think>" stays text: escaped, never an element the browser parsed.
    assert "<think>" not in dom.replace(html.escape("<think>"), "")
    assert all(e["tag"] != "think" for e in tree.elements)
    # Metrics table: base, tuned, delta per metric.
    loss = " ".join(tree.by_id("metric-eval_loss").split())
    assert "2.3125" in loss and "1.4375" in loss and "-0.8750" in loss
    assert "31.25" in tree.by_id("metric-chrf") and "+18.7500" in tree.by_id("metric-chrf")
    assert "eval_rows" in tree.by_id("other-metrics")
    assert "久咳不愈怎么治疗？" in tree.by_id("rows")
    assert "中医助手" in tree.by_id("title")
    # The note a reader must see first (the demo's tiny random model), and each answer's chrF where a
    # reference exists.
    assert "random weights" in tree.by_id("note-0") and "held-out loss is the signal" in tree.by_id("note-0")
    assert dom.index('id="note-0"') < dom.index('id="verdict"')
    assert [" ".join(t.split()) for t in tree.by_class("chrf")] == ["chrF 3.1", "chrF 27.4"]


def test_screenshot_as_the_kubeflow_ui_shows_it(report, tmp_path):
    """The Kubeflow UI puts HTML artifacts in a sandboxed iframe; render it that way and keep the screenshot."""
    wrapper = tmp_path / "kubeflow-view.html"
    wrapper.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body style='margin:0'>"
        f"<iframe sandbox='allow-scripts' style='border:0;width:100%;height:{WINDOW[1]}px' "
        f"srcdoc=\"{html.escape(report.read_text(encoding='utf-8'), quote=True)}\"></iframe></body></html>",
        encoding="utf-8",
    )
    png = tmp_path / "report.png"
    for _ in range(2):  # on a busy machine the iframe can miss the first capture: one more, the same check
        image = screenshot(tmp_path, wrapper, png)
        ink = sum(image.histogram()[:128])  # dark pixels
        if ink > 5000:
            break
    assert image.size == WINDOW
    assert ink > 5000, "the report rendered (almost) blank"
    if os.environ.get("KUBETUNE_SCREENSHOT_DIR"):  # CI keeps it as an artifact
        target = Path(os.environ["KUBETUNE_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target / "report.png")


CELL = 120


def glyph_cells(tmp_path: Path, groups: dict[str, str]) -> dict[str, list[bytes]]:
    """Render each character alone in a fixed cell, in the report's font stack; return each cell's 1-bit ink."""
    rows = "".join(
        "<div class='row'>" + "".join(f"<div class='cell'>{html.escape(ch)}</div>" for ch in chars) + "</div>"
        for chars in groups.values()
    )
    page = tmp_path / "glyphs.html"
    page.write_text(
        "<!DOCTYPE html><html lang='zh-CN'><head><meta charset='utf-8'><style>"
        f"body {{ margin:0; background:#fff; color:#000; font-family:{FONT_STACK}; }}"
        f".row {{ display:flex; height:{CELL}px; }}"
        f".cell {{ width:{CELL}px; height:{CELL}px; font-size:{CELL * 2 // 3}px; line-height:{CELL}px; "
        "text-align:center; overflow:hidden; }"
        f"</style></head><body>{rows}</body></html>",
        encoding="utf-8",
    )
    width = CELL * max(len(chars) for chars in groups.values())
    image = screenshot(tmp_path, page, tmp_path / "glyphs.png", (width, CELL * len(groups)))
    cells: dict[str, list[bytes]] = {}
    for row, (name, chars) in enumerate(groups.items()):
        cells[name] = []
        for column in range(len(chars)):
            box = (column * CELL, row * CELL, (column + 1) * CELL, (row + 1) * CELL)
            cells[name].append(image.crop(box).point(lambda v: 255 if v < 128 else 0).tobytes())
    return cells


def test_chinese_renders_as_glyphs_not_boxes(tmp_path):
    chinese = "久咳不愈怎么治疗"
    cells = glyph_cells(tmp_path, {
        "chinese": chinese,
        "boxes": "\u25a1" * len(chinese),
        # Private-use code points: no font has them, so Chromium draws its missing-glyph box for each. This is
        # what Chinese would look like without a CJK font, and shows that the comparison below can see it.
        "missing": "".join(chr(0xE000 + i) for i in range(len(chinese))),
    })
    ink = {name: [sum(cell) // 255 for cell in group] for name, group in cells.items()}
    assert len(set(cells["missing"])) == 1, "missing glyphs should all render alike (the control is broken)"
    assert all(value > 50 for value in ink["chinese"]), f"some Chinese characters drew nothing: {ink['chinese']}"
    # Real glyphs: each character has its own shape, unlike the box and the missing-glyph box.
    for i, glyph in enumerate(cells["chinese"]):
        assert overlap(glyph, cells["missing"][0]) < 0.5, f"{chinese[i]!r} looks like a missing glyph: no CJK font?"
        assert overlap(glyph, cells["boxes"][0]) < 0.5, f"{chinese[i]!r} looks like a box"
        for j in range(i):
            assert overlap(glyph, cells["chinese"][j]) < 0.8, f"{chinese[i]!r} and {chinese[j]!r} render alike"


def overlap(a: bytes, b: bytes) -> float:
    """Intersection over union of two cells' ink (1.0 = the same shape)."""
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    either = sum(1 for x, y in zip(a, b, strict=True) if x or y)
    return both / either if either else 1.0


# -- the SFT step's page: curves from a real tiny training run ---------------------------------------------------
@pytest.fixture(scope="module")
def trained(quantized_model_dir, prepare_sample, tmp_path_factory):
    from kubetune.config import LoraSettings, TrainConfig
    from kubetune.sft import train_lora

    root = tmp_path_factory.mktemp("curves")
    prepared = prepare_sample(max_length=256, max_samples=48)
    return train_lora(quantized_model_dir, str(prepared / "train.parquet"), str(root / "adapter"),
                      lora=LoraSettings(lora_r=4), train=TrainConfig(max_steps=6, learning_rate=5e-3, save_steps=0),
                      max_length=256, checkpoint_dir=str(root / "ckpt"))


def test_training_page_draws_the_runs_curves(trained, tmp_path):
    from kubetune.training_page import render_training_page

    page = tmp_path / "training.html"
    page.write_text(render_training_page(trained.history, metrics=trained.metrics, plan=trained.plan.reasons,
                                         mlflow_run_url="http://mlflow.example.com/#/experiments/1/runs/abc"),
                    encoding="utf-8")
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())

    class Curves(HTMLParser):
        def __init__(self):
            super().__init__()
            self.series, self.current = {}, None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "svg" and "curve" in attrs.get("class", ""):
                self.current = attrs["data-series"]
            if tag == "polyline" and self.current:
                self.series[self.current] = attrs

    curves = Curves()
    curves.feed(dom)
    logged = [row for row in trained.history if "loss" in row]
    loss = curves.series["loss"]
    steps = [float(s) for s in loss["data-steps"].split(",")]
    assert steps == [row["step"] for row in logged] and steps == sorted(set(steps)) and len(steps) == 6
    assert [float(v) for v in loss["data-values"].split(",")] == pytest.approx([row["loss"] for row in logged],
                                                                               rel=1e-5)
    xs = [float(point.split(",")[0]) for point in loss["points"].split()]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)  # a monotone x axis
    assert {"loss", "learning_rate", "tokens_per_second"} <= set(curves.series)
    assert "Open the run in MLflow" in dom and "Speed plan" in dom
    image = screenshot(tmp_path, page, tmp_path / "training.png", (1280, 900))
    assert image.getextrema()[0] < 200  # something is drawn, not a blank page
