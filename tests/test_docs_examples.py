"""Executes every Python example of README.md and docs/*.md.

Conventions for writing docs (README.md and every page under docs/):

- A fenced block whose info string is `python` runs. Blocks fenced as `text`, `bash`, `console`
  or anything else never run: use `text` for command lines and output.
- A `python` block that must not run (it needs a download, a GPU, a long time) is preceded, on
  the line right before its fence, by the HTML comment `<!-- no-run -->` (invisible when
  rendered, and the block keeps its highlighting).
- A `python` block for one Keras backend only (`tf.distribute` needs TensorFlow,
  `keras.distribution` JAX) is preceded the same way by `<!-- backend: tensorflow -->` (or
  `jax`, `torch`): it runs when the suite runs on that backend (`KERAS_BACKEND`), and only then.
- The blocks of one page run in order, in one namespace, in a fresh temporary working directory:
  later blocks see earlier blocks' names and files.
- The preamble every page can rely on:
    * `pretrained.h5` in the working directory: a small CNN (8x8x1 inputs -> 5 softmax outputs,
      layers conv1, conv2, pool, flatten, fc1, fc2, drop, out) pre-trained on scikit-learn's
      digits 0-4 and saved by Keras as `.h5` (the session fixture of tests/conftest.py);
    * `x_train`, `y_train`: 300 images (float32, (300, 8, 8, 1)) of the digits 5-9, labels 0-4;
    * `x_val`, `y_val`: 150 more of the same task.
  Nothing else: pages import what they use, so a reader can copy them.
- Keep examples small (a few epochs on this data): the whole file should run in well under a
  minute.

Tracebacks point at the Markdown file and line of the failing statement.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import pytest
from conftest import Digits, Pretrained

ROOT = Path(__file__).resolve().parents[1]
NO_RUN = "<!-- no-run -->"
_BACKEND = re.compile(r"^<!-- backend: (?P<name>[a-z]+) -->$")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, first code line (1-based) and code."""

    lang: str
    line: int
    code: str
    no_run: bool
    backend: str | None = None


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text (also indented ones, e.g. inside admonitions)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        info = match["info"].strip().split()
        previous = lines[i - 1].strip() if i else ""
        only = _BACKEND.match(previous)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""
        ):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(
            Block(
                lang=info[0].lower() if info else "",
                line=i + 2,
                code="\n".join(body) + "\n",
                no_run=previous == NO_RUN,
                backend=only["name"] if only else None,
            )
        )
        i = j + 1
    return blocks


def runnable(path: Path, backend: str | None = None) -> list[Block]:
    """The blocks of a page that run on `backend` (the Keras backend in use by default)."""
    backend = backend or keras.backend.backend()
    return [
        b
        for b in fenced_blocks(path.read_text())
        if b.lang == "python" and not b.no_run and b.backend in (None, backend)
    ]


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = [p for p in PAGES if runnable(p)]


def test_extraction_finds_the_examples() -> None:
    text = "\n".join(
        [
            "```python",
            "a = 1",
            "```",
            "    ```python",
            "    b = a + 1",
            "    ```",
            NO_RUN,
            "```python",
            "raise SystemExit",
            "```",
            "```text",
            "$ transferkit --help",
            "```",
            "<!-- backend: jax -->",
            "```python",
            "c = 3",
            "```",
        ]
    )
    blocks = fenced_blocks(text)
    assert [(b.lang, b.line, b.no_run, b.backend) for b in blocks] == [
        ("python", 2, False, None),
        ("python", 5, False, None),
        ("python", 9, True, None),
        ("text", 12, False, None),
        ("python", 16, False, "jax"),
    ]
    assert blocks[1].code == "b = a + 1\n"
    # The docs have examples on most pages; a broken extractor would find none.
    assert sum(len(runnable(p)) for p in PAGES) >= 15
    assert len(RUNNABLE) >= 6
    # Each engine's page section runs on its backend.
    scaling = ROOT / "docs" / "scaling-out.md"
    assert {b.backend for b in fenced_blocks(scaling.read_text())} >= {"tensorflow", "jax"}


@pytest.fixture
def preamble(
    pretrained: Pretrained,
    digits: Digits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, object]:
    shutil.copy(pretrained.h5, tmp_path / "pretrained.h5")
    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    return {
        "__name__": "__docs__",
        "x_train": digits.x_new[:300],
        "y_train": digits.y_new[:300],
        "x_val": digits.x_new[300:450],
        "y_val": digits.y_new[300:450],
    }


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_examples_run(page: Path, preamble: dict[str, object]) -> None:
    for block in runnable(page):
        # Padding with newlines makes tracebacks show the Markdown file's own line numbers.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(page), "exec"), preamble)
