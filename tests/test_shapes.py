"""The shapes task generator is deterministic and the shipped splits are its output."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from impq.datasets import shapes
from impq.defaults import default_calib_data, default_eval_data


def test_same_seed_same_scene_and_questions():
    image_a, qa_a = shapes.sample(1234, n_questions=5)
    image_b, qa_b = shapes.sample(1234, n_questions=5)
    assert image_a.tobytes() == image_b.tobytes() and qa_a == qa_b
    image_c, _ = shapes.sample(1235, n_questions=5)
    assert image_a.tobytes() != image_c.tobytes()


def test_write_split_is_reproducible(tmp_path):
    a = shapes.write_split("eval", tmp_path / "a", 14)
    b = shapes.write_split("eval", tmp_path / "b", 14)
    assert a.read_text() == b.read_text()
    for line in a.read_text().splitlines():
        name = json.loads(line)["image"]
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shipped_eval_split_is_the_generators_output(tmp_path):
    shipped = default_eval_data()
    regenerated = shapes.write_split("eval", tmp_path, 21)
    assert shipped.read_text().splitlines()[:21] == regenerated.read_text().splitlines()
    first = json.loads(regenerated.read_text().splitlines()[0])["image"]
    assert (shipped.parent / first).read_bytes() == (tmp_path / first).read_bytes()


def test_shipped_splits_cover_every_question_type():
    items = [json.loads(line) for line in default_eval_data().read_text().splitlines()]
    assert len(items) >= 600
    counts = Counter(item["type"] for item in items)
    assert set(counts) == set(shapes.QUESTION_TYPES) and min(counts.values()) >= 90
    assert all(Path(default_eval_data().parent / item["image"]).is_file() for item in items)
    calib = default_calib_data().read_text().splitlines()
    assert len(calib) >= 128
    assert not {json.loads(line)["image"] for line in calib} & {item["image"] for item in items}


def test_every_answer_is_one_word():
    for seed in range(200):
        _, qas = shapes.sample(seed, n_questions=7)
        assert all(len(qa["answer"].split()) == 1 for qa in qas)
