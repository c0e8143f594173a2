"""The launch scripts of lora-scripts (``train.ps1``, ``train.sh``): their settings as kohya options.

Those scripts set variables (``$network_dim = 32`` / ``network_dim=32``), collect optional
flags in an array under ``if`` conditions (``[void]$ext_args.Add("--clip_skip=$clip_skip")``,
``extArgs+=("--clip_skip $clip_skip")``) and end in one ``accelerate launch … train_network.py
--flag=$var … $ext_args`` line. This is a small interpreter of exactly those constructs
(assignments, string interpolation, arrays, if/elseif/else with comparisons): it never runs
anything, and what it cannot evaluate is reported, not guessed.
"""
from __future__ import annotations

import re
import shlex

_PS_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_SH_VAR = re.compile(r"\$(?:\{(\w+)(?:\[[@*]\])?\}|(\w+))")


class ScriptError(ValueError):
    pass


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def _split(text: str, seps: str) -> list[str]:
    """``text`` cut at each character of ``seps`` outside quotes; braces come out as pieces of their own."""
    out, cur, quote = [], [], ""
    for ch in text:
        if quote:
            cur.append(ch)
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch in seps:
            out.append("".join(cur))
            if ch in "{}":
                out.append(ch)
            cur = []
        elif ch == "#":
            out.append("".join(cur))
            return [p.strip() for p in out if p.strip()]
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [p.strip() for p in out if p.strip()]


def shell_words(text: str) -> list[str]:
    """Shell words, quotes removed; backslashes kept (Windows paths)."""
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split, lex.escape, lex.commenters = True, "", ""
    try:
        return list(lex)
    except ValueError as exc:
        raise ScriptError(f"cannot split {text!r}: {exc}") from None


class _Interp:
    """State shared by the two dialects: variables, if-frames, the launch command."""

    def __init__(self):
        self.vars: dict = {}
        self.frames: list[list[bool]] = []  # [active, taken]
        self.last: list[bool] | None = None  # the frame just closed, for else/elseif
        self.command: list[str] | None = None
        self.notes: list[str] = []

    @property
    def active(self) -> bool:
        return all(f[0] for f in self.frames)

    def open(self, kind: str, cond: bool | None) -> None:
        parent = self.active
        if kind == "if":
            frame = [parent and bool(cond), bool(cond)]
        else:  # elseif / else: only when no earlier branch was taken
            taken = bool(self.last and self.last[1])
            go = not taken and (cond if kind == "elseif" else True)
            frame = [parent and bool(go), taken or bool(go)]
        self.frames.append(frame)

    def close(self) -> None:
        if self.frames:
            self.last = self.frames.pop()

    def text(self, value) -> str:
        if isinstance(value, bool):
            return "True" if value else "False"
        if isinstance(value, list):
            return " ".join(self.text(v) for v in value)
        return "" if value is None else str(value)

    def truthy(self, value) -> bool:
        if isinstance(value, list):
            return bool(value)
        return bool(value) if not isinstance(value, str) else value != ""

    def compare(self, left, op: str, right) -> bool:
        try:
            a, b = float(self.text(left)), float(self.text(right))
        except ValueError:
            a, b = self.text(left).lower(), self.text(right).lower()
        ops = {"eq": a == b, "ne": a != b, "gt": a > b, "lt": a < b, "ge": a >= b, "le": a <= b}
        return ops[op]


# --- PowerShell ------------------------------------------------------------------------

class _PowerShell(_Interp):
    def interpolate(self, s: str) -> str:
        return _PS_VAR.sub(lambda m: self.text(self.vars.get(m.group(1) or m.group(2), "")), s)

    def value(self, expr: str):
        """A right-hand side: strings (with $var inside "…"), numbers, $true/$false, arrays, + joins."""
        expr = expr.strip()
        if re.fullmatch(r"\[System\.Collections\.(ArrayList|Generic\.List\[\w+\])\]::new\(\)|@\(\s*\)", expr, re.I):
            return []
        m = re.fullmatch(r"@\((.*)\)", expr, re.S)
        if m:
            return [self.value(p) for p in _split(m.group(1), ",")]
        parts = _split(expr, "+")
        if len(parts) > 1:
            return "".join(self.text(self.value(p)) for p in parts)
        if expr.lower() in ("$true", "$false", "$null"):
            return {"$true": True, "$false": False, "$null": None}[expr.lower()]
        if re.fullmatch(r"\$\w+", expr):
            return self.vars.get(expr[1:], "")
        if len(expr) >= 2 and expr[0] == expr[-1] == '"':
            return self.interpolate(expr[1:-1])
        if len(expr) >= 2 and expr[0] == expr[-1] == "'":
            return expr[1:-1]
        try:
            return _number(expr)
        except ValueError:
            return self.interpolate(expr)

    def condition(self, cond: str) -> bool:
        for op, join in ((" -or ", any), (" -and ", all)):
            if op in cond.lower():
                return join(self.condition(c) for c in re.split(op, cond, flags=re.I))
        cond = cond.strip()
        if cond.startswith("(") and cond.endswith(")"):
            return self.condition(cond[1:-1])
        m = re.fullmatch(r"(?:-not\s+|!)(.*)", cond, re.I)
        if m:
            return not self.condition(m.group(1))
        m = re.fullmatch(r"(.+?)\s+-(i?c?)(eq|ne|gt|lt|ge|le)\s+(.+)", cond, re.I)
        if m:
            return self.compare(self.value(m.group(1)), m.group(3).lower(), self.value(m.group(4)))
        return self.truthy(self.value(cond))

    def statement(self, st: str, pending: list) -> None:
        m = re.fullmatch(r"(if|elseif)\s*\((.*)\)", st, re.I | re.S)
        if m:
            pending.append((m.group(1).lower(), self.condition(m.group(2)) if self.active else False))
            return
        if st.lower() == "else":
            pending.append(("else", None))
            return
        if not self.active:
            return
        if re.match(r"(foreach|for|while|do|switch|function)\b", st, re.I):
            self.notes.append(f"`{st[:40]}` is not evaluated (loops and functions are not read)")
            return
        m = re.fullmatch(r"(?:\[void\]\s*)?\$(\w+)\.Add\((.*)\)(?:\s*\|\s*Out-Null)?", st, re.I | re.S)
        if m:
            if not isinstance(self.vars.get(m.group(1)), list):
                self.vars[m.group(1)] = []
            self.vars[m.group(1)].append(self.value(m.group(2)))
            return
        m = re.fullmatch(r"\$(\w+)\s*\+=\s*(.+)", st, re.S)
        if m:
            cur, new = self.vars.get(m.group(1), []), self.value(m.group(2))
            self.vars[m.group(1)] = cur + (new if isinstance(new, list) else [new]) if isinstance(cur, list) \
                else self.text(cur) + self.text(new)
            return
        m = re.fullmatch(r"\$(\w+)\s*=\s*(.+)", st, re.S)
        if m:
            self.vars[m.group(1)] = self.value(m.group(2))
            return
        if re.search(r"\.py\b|accelerate", st) and ("--" in st or "$" in st):
            self.command = self.expand(shell_words(st))

    def expand(self, words: list[str]) -> list[str]:
        out = []
        for w in words:
            whole = re.fullmatch(r"\$(\w+)", w)
            if whole and isinstance(self.vars.get(whole.group(1)), list):
                out += [self.text(v) for v in self.vars[whole.group(1)]]  # an array splices one word per item
            else:
                out.append(self.interpolate(w))
        return out


def read_ps1(text: str) -> tuple[list[str], list[str]]:
    """(the launch command's words, notes) of a PowerShell script."""
    text = re.sub(r"<#.*?#>", "", text, flags=re.S)
    text = re.sub(r"`\r?\n", " ", text)
    ps = _PowerShell()
    pending: list = []  # an if/elseif/else waiting for its "{" (which may be on the next line)
    for line in text.splitlines():
        for piece in _split(line, ";{}"):
            if piece == "{":
                kind, cond = pending.pop() if pending else ("if", True)
                ps.open(kind, cond)
            elif piece == "}":
                ps.close()
            else:
                ps.statement(piece, pending)
    if ps.command is None:
        raise ScriptError("no `accelerate launch … train_network.py` (or `python … .py`) line found")
    return ps.command, ps.notes


# --- bash ----------------------------------------------------------------------------

class _Bash(_Interp):
    def interpolate(self, s: str) -> str:
        return _SH_VAR.sub(lambda m: self.text(self.vars.get(m.group(1) or m.group(2), "")), s)

    def word(self, raw: str):
        raw = raw.strip()
        if raw.startswith("(") and raw.endswith(")"):
            return [self.interpolate(w) for w in shell_words(raw[1:-1])]
        return "".join(self.interpolate(w) for w in shell_words(raw)) if raw else ""

    def condition(self, cond: str) -> bool:
        cond = cond.strip()
        for op, join in (("||", any), ("&&", all)):
            if op in cond:
                return join(self.condition(c) for c in cond.split(op))
        m = re.fullmatch(r"\[\[?(.*?)\]?\]", cond, re.S)
        if not m:
            raise ScriptError(f"cannot evaluate the condition {cond!r}")
        words = [self.interpolate(w) for w in shell_words(m.group(1))]
        if len(words) == 3 and words[1] in ("==", "=", "!="):
            return (words[0] == words[2]) == (words[1] != "!=")
        if len(words) == 3 and words[1].startswith("-") and words[1][1:] in ("eq", "ne", "gt", "lt", "ge", "le"):
            return self.compare(words[0], words[1][1:], words[2])
        if len(words) == 2 and words[0] in ("-n", "-z"):
            return (words[1] != "") == (words[0] == "-n")
        if len(words) == 2 and words[0] == "!":
            return words[1] == ""
        if len(words) <= 1:
            return bool(words and words[0])
        raise ScriptError(f"cannot evaluate the condition {cond!r}")

    def statement(self, st: str) -> None:
        m = re.fullmatch(r"(then|else|do)\s+(.+)", st, re.S)
        if m:  # "then extArgs+=(…)" on the if's line
            self.statement(m.group(1))
            self.statement(m.group(2))
            return
        m = re.fullmatch(r"(if|elif)\s+(.+)", st, re.S)
        if m:
            if m.group(1) == "elif":
                self.close()
            try:
                cond = self.condition(m.group(2)) if self.active else False
            except ScriptError as exc:
                self.notes.append(f"{exc}: the script's branch under it is taken as not run")
                cond = False
            self.pending = (m.group(1).replace("elif", "elseif"), cond)
            return
        if re.match(r"(for|while|until|case|function)\b|\w+\s*\(\)", st):
            self.notes.append(f"`{st[:40]}` is not evaluated (loops and functions are not read)")
            return
        if st == "then":
            self.open(*self.pending)
            return
        if st == "else":
            self.close()
            self.open("else", None)
            return
        if st == "fi":
            self.close()
            return
        if not self.active:
            return
        m = re.fullmatch(r"(?:export\s+|local\s+)?(\w+)(\+?)=(.*)", st, re.S)
        if m:
            value = self.word(m.group(3))
            if m.group(2):
                cur = self.vars.get(m.group(1), [] if isinstance(value, list) else "")
                value = cur + value if isinstance(cur, list) and isinstance(value, list) else self.text(cur) + self.text(value)
            self.vars[m.group(1)] = value
            return
        if re.search(r"\.py\b|accelerate", st) and "--" in st:
            self.command = self.expand(st)

    def expand(self, st: str) -> list[str]:
        out = []
        for w in shell_words(st):
            whole = re.fullmatch(r"\$\{(\w+)\[[@*]\]\}|\$(\w+)", w)
            value = self.vars.get(whole.group(1) or whole.group(2)) if whole else None
            if isinstance(value, list):  # unquoted ${arr[@]}: each element, split at spaces
                out += [x for v in value for x in self.text(v).split()]
            else:
                out.append(self.interpolate(w))
        return out


def read_sh(text: str) -> tuple[list[str], list[str]]:
    """(the launch command's words, notes) of a bash script."""
    text = re.sub(r"\\\r?\n", " ", text)
    sh = _Bash()
    sh.pending = ("if", False)
    for line in text.splitlines():
        for piece in _split(line, ";"):
            sh.statement(piece)
    if sh.command is None:
        raise ScriptError("no `accelerate launch … train_network.py` (or `python … .py`) line found")
    return sh.command, sh.notes
