"""The shipped pair in the clients people use: the embedded chat template renders Imp's own prompt from every
message form, and llama-cpp-python's high-level API and an OpenAI-compatible server on 127.0.0.1 give the same
answers as `impq eval` (impq's runner) on a slice of the eval split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from impq.defaults import default_eval_data, default_model_dir
from impq.recipe import export_with_recipe
from impq.families import MEDIA_MARKER, TEXT_FAMILIES
from impq.measure.clients import answers_llama_cpp_python, answers_mtmd_cli, answers_openai, openai_server
from impq.measure.vqa import GGUFAnswerer, evaluate, first_per_type, normalize_answer, read_vqa_jsonl
from impq.models.layouts import read_spec

CHAT_TEMPLATES = {name: family.chat_template for name, family in TEXT_FAMILIES.items()}
PROMPT_TEMPLATES = {name: family.prompt_template for name, family in TEXT_FAMILIES.items()}

QUESTION = "What color is the  circle?\nAnswer in one word."


def _render(template: str, messages: list[dict]) -> str:
    # the environment llama-cpp-python's MTMDChatHandler renders with
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="<s>",
                                            eos_token="</s>")


def _message_forms(marker: str) -> dict[str, list]:
    return {
        "parts, image first (MTMDChatHandler)": [{"type": "text", "text": marker}, {"type": "text", "text": QUESTION}],
        "parts, text first": [{"type": "text", "text": QUESTION}, {"type": "text", "text": marker}],
        "OpenAI image_url part": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": QUESTION}],
        "string, marker in front (llama-mtmd-cli)": marker + QUESTION,
        "string, marker and newline": marker + "\n" + QUESTION,
        "string, llama-server's random marker": "<__media_a1B2c3__>" + QUESTION,
    }


@pytest.mark.parametrize("family", sorted(CHAT_TEMPLATES))
def test_chat_template_renders_the_trained_prompt_from_every_message_form(family):
    for form, content in _message_forms(MEDIA_MARKER).items():
        marker = "<__media_a1B2c3__>" if "random" in form else MEDIA_MARKER
        rendered = _render(CHAT_TEMPLATES[family], [{"role": "user", "content": content}])
        assert rendered == PROMPT_TEMPLATES[family].replace("<image>", marker).replace("{question}", QUESTION), form
    text_only = _render(CHAT_TEMPLATES[family], [{"role": "user", "content": QUESTION}])
    assert text_only == PROMPT_TEMPLATES[family].replace("<image>\n", "").replace("{question}", QUESTION)
    hf_style = _render(CHAT_TEMPLATES[family], [{"role": "user", "content": [{"type": "image"},
                                                                            {"type": "text", "text": QUESTION}]}])
    assert hf_style == PROMPT_TEMPLATES[family].replace("{question}", QUESTION)


@pytest.mark.parametrize("family", sorted(CHAT_TEMPLATES))
def test_chat_template_keeps_a_conversation(family):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": MEDIA_MARKER}, {"type": "text", "text": "Hi?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                {"role": "user", "content": "And the square?"}]
    rendered = _render(CHAT_TEMPLATES[family], messages)
    assert rendered.count(MEDIA_MARKER) == 1 and "Be brief." in rendered and "red" in rendered
    assert rendered.index(MEDIA_MARKER) < rendered.index("Hi?") < rendered.index("red") < rendered.index("And the")
    assert "A chat between" not in rendered                  # the given system prompt replaces the default


@pytest.fixture(scope="module")
def shipped_pair(tmp_path_factory):
    result = export_with_recipe(read_spec(default_model_dir()), tmp_path_factory.mktemp("imp-tiny-pair"), "f16")
    return result.text_path, result.mmproj_path


@pytest.fixture(scope="module")
def eval_slice():
    """Two items of each question type from the shipped eval split."""
    return first_per_type(read_vqa_jsonl(default_eval_data()), 2)


@pytest.fixture(scope="module")
def eval_answers(shipped_pair, eval_slice):
    with GGUFAnswerer(*shipped_pair) as answerer:
        report = evaluate(answerer, eval_slice, model="pair", dataset="slice")
    assert report.accuracy >= 0.9                              # the comparison is between working answers
    return [record["prediction"] for record in report.items]


def test_llama_cpp_python_high_level_api_answers_as_impq_eval(shipped_pair, eval_slice, eval_answers):
    answers = answers_llama_cpp_python(*shipped_pair, eval_slice)
    assert [normalize_answer(a) for a in answers] == eval_answers


def test_openai_server_answers_as_impq_eval(shipped_pair, eval_slice, eval_answers):
    with openai_server(*shipped_pair) as url:
        assert url.startswith("http://127.0.0.1:")
        answers = answers_openai(url, eval_slice)
    assert [normalize_answer(a) for a in answers] == eval_answers


def _llama_cpp_tool(name: str) -> Path | None:
    """llama.cpp's own tools, where built (../shared/tools/build-llama-cpp-tools.sh): IMPQ_LLAMA_CPP_BIN or PATH."""
    folder = os.environ.get("IMPQ_LLAMA_CPP_BIN")
    found = Path(folder) / name if folder else (Path(p) if (p := shutil.which(name)) else None)
    return found if found is not None and found.is_file() else None


@pytest.mark.skipif(_llama_cpp_tool("llama-server") is None, reason="llama.cpp's llama-server is not built here")
def test_llama_server_answers_as_impq_eval(shipped_pair, eval_slice, eval_answers):
    with openai_server(*shipped_pair, llama_server=_llama_cpp_tool("llama-server")) as url:
        answers = answers_openai(url, eval_slice)
    assert [normalize_answer(a) for a in answers] == eval_answers


@pytest.mark.skipif(_llama_cpp_tool("llama-mtmd-cli") is None, reason="llama.cpp's llama-mtmd-cli is not built here")
def test_llama_mtmd_cli_answers_as_impq_eval(shipped_pair, eval_slice, eval_answers):
    answers = answers_mtmd_cli(_llama_cpp_tool("llama-mtmd-cli"), *shipped_pair, eval_slice[:4])
    assert [normalize_answer(a) for a in answers] == eval_answers[:4]
