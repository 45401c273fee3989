"""Tool calls in the Hermes / Qwen format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`:
the tools described to the model (through the chat template where it takes `tools`, else in the
system message), the grammar that `tool_choice` imposes, and the calls parsed out of the output,
whole or as they stream."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL = 4                   # calls one answer may make with parallel_tool_calls
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def tool_specs(tools) -> list[dict]:
    """The request's tools as plain dicts ({"type": "function", "function": {...}})."""
    return [t.model_dump(by_alias=True, exclude_none=True) for t in tools or ()]


def template_takes_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template) is not None


def chat_messages(req, with_tools: bool, template: str | None) -> tuple[list[dict], dict]:
    """The request's messages as the template takes them, and the extra template context.
    An assistant's tool calls become <tool_call> blocks in its content and a tool's answer a
    <tool_response> (as the user, where the template knows no tools); the tools are described
    through the template's `tools` variable where it has one, else in the system message."""
    native = template_takes_tools(template)
    out = []
    for m in req.messages:
        text = m.text()
        if m.role == "assistant" and m.tool_calls:
            calls = "\n".join(f"{OPEN}\n" + json.dumps({"name": c.function.name, "arguments": _args(c.function.arguments)},
                                                       ensure_ascii=False) + f"\n{CLOSE}" for c in m.tool_calls)
            text = f"{text}\n{calls}" if text else calls
            msg = {"role": "assistant", "content": text}
            if native:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        elif m.role == "tool":
            msg = ({"role": "tool", "content": text} if native else
                   {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
        else:
            msg = {"role": m.role, "content": text}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    context: dict = {}
    if with_tools:
        specs = tool_specs(req.tools)
        if native:
            context["tools"] = specs
        else:
            described = _SYSTEM.format(tools="\n".join(json.dumps(s, ensure_ascii=False) for s in specs))
            if out and out[0]["role"] in ("system", "developer"):
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}"}
            else:
                out.insert(0, {"role": "system", "content": described})
    return out, context


def _args(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def call_schema(fn) -> dict:
    """The JSON Schema of one call of function `fn` (a FunctionDefinition)."""
    params = fn.parameters if fn.parameters else {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": fn.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def lark(req, answer_schema: dict | None) -> str | None:
    """The Lark grammar (llguidance's dialect) that the request's tool_choice imposes, or None for
    no constraint. required: one or more calls; a named function: one call of it; auto: calls, or
    an answer (free text that does not open with '<', or JSON under `answer_schema`)."""
    choice = req.tool_choice or "auto"
    if not req.tools or choice == "none":
        return None
    from ..engine.structured import JSON_OPTIONS

    fns = [t.function for t in req.tools]
    if not isinstance(choice, str):
        fns = [f for f in fns if f.name == choice.function.name]
    many = req.parallel_tool_calls and isinstance(choice, str)
    rules = []
    for i, fn in enumerate(fns):
        schema = {**call_schema(fn), "x-guidance": JSON_OPTIONS}
        rules.append(f"call{i}: %json {json.dumps(schema)}")
    calls = " | ".join(f"call{i}" for i in range(len(fns)))
    lines = [f'call: "{OPEN}\\n" ({calls}) "\\n{CLOSE}"', *rules]
    repeat = "call" if not many else " | ".join(" \"\\n\" ".join(["call"] * k) for k in range(1, MAX_PARALLEL + 1))
    lines.insert(0, "calls: " + repeat)
    if choice == "auto":
        if answer_schema is not None:
            lines.insert(0, f"answer: %json {json.dumps({**answer_schema, 'x-guidance': JSON_OPTIONS})}")
        else:
            lines.insert(0, r"answer: /[^<\s][^\x00]*/")
        lines.insert(0, "start: answer | calls")
    else:
        lines.insert(0, "start: calls")
    return "\n".join(lines)


@dataclass
class Parsed:
    content: str | None
    calls: list[dict] = field(default_factory=list)   # OpenAI tool_calls entries


def new_call(name: str, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def _call_of(body: str, names: set[str]) -> dict | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return new_call(obj["name"], args if isinstance(args, dict) else {})


def parse(text: str, tools) -> Parsed:
    """The calls in a finished output: <tool_call> blocks, or (the generic fallback) an output
    that is one bare {"name", "arguments"} object naming a tool; the text before them is the content."""
    names = {t.function.name for t in tools}
    calls = [c for c in (_call_of(m.group(1), names) for m in _CALL.finditer(text)) if c is not None]
    if calls:
        head = text[:text.find(OPEN)].strip()
        return Parsed(head or None, calls)
    bare = _call_of(text.strip(), names) if text.strip().startswith("{") else None
    if bare is not None:
        return Parsed(None, [bare])
    return Parsed(text)


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')


class _Args:
    """Where a call's arguments value ends, found as its text arrives: an object, array or string
    ends at its closing character, any other value before the next delimiter."""

    def __init__(self):
        self.kind = ""
        self.depth, self.in_str, self.esc = 0, False, False
        self.end: int | None = None

    def scan(self, text: str, start: int) -> int:
        """Scans text[start:]; returns how far the value's text is known (its end once found)."""
        for k in range(start, len(text)):
            ch = text[k]
            if not self.kind:
                self.kind = ch
                if ch in "{[":
                    self.depth = 1
                elif ch == '"':
                    self.in_str = True
                continue
            if self.kind not in '{["':                     # a number, true, false, null
                if ch in ",}]" or ch.isspace():
                    self.end = k
                    return k
            elif self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
                    if self.depth == 0:
                        self.end = k + 1
                        return k + 1
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = k + 1
                    return k + 1
        return len(text) if self.kind in '{["' else start


class StreamParser:
    """Splits a streamed output into content deltas and `delta.tool_calls` entries: text that may
    still open a <tool_call> is held back until it does or cannot; inside a call, once its name is
    known, the call is announced (index, id, type, name, empty arguments) and its arguments' text
    follows in pieces as it arrives (as OpenAI streams them); a call whose text does not open with
    its name is sent whole when it closes."""

    def __init__(self, tools):
        self.names = {t.function.name for t in tools}
        self.buf = ""
        self.in_calls = False
        self.num_calls = 0
        self._reset_call()

    def _reset_call(self) -> None:
        self._head: int | None = None      # where the streamed call's arguments begin in its body
        self._sent = 0                     # how far its arguments have been sent
        self._args = _Args()

    def push(self, text: str) -> tuple[str, list[dict]]:
        """(content to send now, delta.tool_calls entries to send now)."""
        self.buf += text
        content, deltas = "", []
        while True:
            if not self.in_calls:
                i = self.buf.find(OPEN)
                if i < 0:
                    keep = _partial_open(self.buf)
                    content += self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    return content, deltas
                content += self.buf[:i]
                self.buf, self.in_calls = self.buf[i:], True
            j = self.buf.find(CLOSE)
            body = self.buf[len(OPEN):j if j >= 0 else len(self.buf)]
            self._stream(body, deltas)
            if j < 0:
                return content, deltas
            block, self.buf = self.buf[:j + len(CLOSE)], self.buf[j + len(CLOSE):]
            if self._head is not None:                       # streamed: send what is left of its arguments
                if self._args.end is None:
                    rest = body[self._sent:].rstrip()
                    rest = rest[:-1].rstrip() if rest.endswith("}") else rest
                    if rest:
                        deltas.append({"index": self.num_calls, "function": {"arguments": rest}})
                self.num_calls += 1
            else:
                call = _call_of(block[len(OPEN):-len(CLOSE)].strip(), self.names)
                if call is not None:
                    deltas.append({"index": self.num_calls, **call})
                    self.num_calls += 1
                else:
                    content += block
            self.in_calls = False
            self._reset_call()

    def _stream(self, body: str, deltas: list[dict]) -> None:
        """The open call's announcement and new arguments text, where its body shows them."""
        if self._head is None:
            m = _HEAD.match(body)
            if m is None:
                return
            try:
                name = json.loads(f'"{m.group(1)}"')
            except ValueError:
                return
            if name not in self.names:
                return
            self._head = self._sent = m.end()
            call = new_call(name, "")
            deltas.append({"index": self.num_calls, **call})
        if self._args.end is not None:
            return
        upto = self._args.scan(body, max(self._sent, self._head))
        if upto > self._sent:
            deltas.append({"index": self.num_calls, "function": {"arguments": body[self._sent:upto]}})
            self._sent = upto

    def flush(self) -> str:
        """What is left at the end, as content."""
        rest, self.buf = self.buf, ""
        return rest


def _partial_open(text: str) -> int:
    """Length of the longest tail of `text` that begins '<tool_call>'."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0
