"""README's Python example runs as written (tiny model, in a fresh folder beside a copy of examples/)."""

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]


def python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    namespace: dict = {}
    exec(compile(python_example(), "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    result, sweep = namespace["result"], namespace["sweep"]
    assert result.frames.shape == (16, 128, 128, 3) and result.frames.dtype == np.uint8
    assert (tmp_path / "waving.mp4").is_file() and (tmp_path / "waving.json").is_file()
    assert namespace["loop"].frames.shape[0] == 15 and namespace["long"].frames.shape[0] == 24
    assert [row["lambda"] for row in sweep.rows] == [0.0, 0.5, 1.0]
    assert (tmp_path / "astronaut_1.mp4").is_file() and (tmp_path / "astronaut_2.mp4").is_file()
