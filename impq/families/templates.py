"""Prompt and chat templates from a family's pieces.

Jinja chat templates embedded in the GGUF (stock llama-mtmd-cli refuses to run without one). For one user turn
with one image they render exactly the family's prompt template, whatever form the client sends the message in:
- a string (llama-mtmd-cli puts mtmd's marker "<__media__>" in front of the prompt; llama-server joins text and
  its own random "<__media_XXXX__>" marker into one string, without a newline between them);
- a list of parts (llama-cpp-python's MTMDChatHandler: {"type": "text"} parts, images already replaced by the
  marker; OpenAI-style {"type": "image_url"} and transformers-style {"type": "image"} parts).
Every media marker found is moved to where the family's template puts <image>, followed by the text that
separates <image> from the question there (a newline for every Imp template), then the message's text.
"""

from __future__ import annotations

# Imp / Bunny's system prompt (imp_llava/conversation.py)
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
MEDIA_MARKER = "<__media__>"          # llama.cpp's mtmd_default_marker()
_MARKER_HEAD, _MARKER_TAIL = "<__media", "__>"


def _message_content_jinja(separator: str) -> str:
    """Jinja that sets `content` for the message `m`: its media markers first, each followed by `separator`."""
    sep = separator.replace("\n", "\\n")
    return (
        "{%- set ns = namespace(images='', text='') -%}"
        "{%- set parts = [{'type': 'text', 'text': m['content']}] if m['content'] is string else m['content'] -%}"
        "{%- for p in parts -%}"
        "{%- if p['type'] == 'image' -%}{%- set ns.images = ns.images + '<image>" + sep + "' -%}"
        "{%- elif p['type'] == 'image_url' -%}{%- set ns.images = ns.images + '" + MEDIA_MARKER + sep + "' -%}"
        "{%- elif p['type'] == 'text' -%}"
        "{%- set pieces = p['text'].split('" + _MARKER_HEAD + "') -%}"
        "{%- set ns.text = ns.text + ('\\n' if ns.text and pieces[0] else '') + pieces[0] -%}"
        "{%- for piece in pieces[1:] -%}"
        "{%- set tail = piece.split('" + _MARKER_TAIL + "', 1) -%}"
        "{%- set ns.images = ns.images + '" + _MARKER_HEAD + "' + tail[0] + '" + _MARKER_TAIL + sep + "' -%}"
        "{%- set ns.text = ns.text + (tail[1] if tail | length > 1 else '') -%}"
        "{%- endfor -%}{%- endif -%}{%- endfor -%}"
        "{%- set content = ns.images + (ns.text | trim) -%}")


def chat_template(prompt_template: str, default_system: str | None, system: str, user: str, assistant: str,
                  generation: str, bos: str = "") -> str:
    """A chat template from the family's pieces: each a Jinja expression over `content` (and `m['role']`);
    `prompt_template` (with <image> and {question}) says what separates the image from the question."""
    separator = prompt_template.split("<image>")[1].split("{question}")[0]
    first = ("" if default_system is None else
             "{%- if loop.first and m['role'] != 'system' -%}{{ " + default_system + " }}{%- endif -%}")
    return (
        '{%- set default_system = "' + SYSTEM + '" -%}' + bos +
        "{%- for m in messages -%}" + _message_content_jinja(separator) + first +
        "{%- if m['role'] == 'system' -%}{{ " + system + " }}"
        "{%- elif m['role'] == 'user' -%}{{ " + user + " }}"
        "{%- else -%}{{ " + assistant + " }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + generation + " }}{%- endif -%}")
