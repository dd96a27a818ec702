"""Readers: a split source (file or hub dataset) to a list of row dicts.

Every row gets an ``id`` (``<split>-<index>`` unless the file has one). Errors name the
file, and for line-based formats the line number, so a broken row is easy to find.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

from tasks.spec import SplitSource


class DataError(ValueError):
    """A data file that is missing, empty or malformed."""


def _read_delimited(path: Path, src: SplitSource, delimiter: str, quoted: bool | None = None) -> list[dict]:
    """csv (quoted fields), tsv (GLUE's: quote characters are text) or, with ``quoted``, a tsv with
    csv-style quoting (``format: tsv_quoted``, what pandas' ``to_csv(sep="\t")`` writes)."""
    rows = []
    quoted = delimiter == "," if quoted is None else quoted
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel's "CSV UTF-8") is not text
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
        header = src.columns
        for lineno, values in enumerate(reader, start=1):
            if header is None:
                header = [h.strip() for h in values]
                continue
            if not values:
                continue
            if len(values) != len(header):
                hint = (" (a tsv whose fields are quoted, as pandas writes them: data.init_args.format: tsv_quoted)"
                        if not quoted and any(v.startswith('"') for v in values) else "")
                raise DataError(f"{path}:{lineno}: expected {len(header)} columns {header}, found {len(values)}{hint}")
            rows.append(dict(zip(header, values)))
    return rows


def _read_jsonl(path: Path, src: SplitSource) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_json(path: Path, src: SplitSource) -> list[dict]:
    data = _read_json_object(path)
    if isinstance(data, dict) and data.get("data") and isinstance(data["data"][0], dict) and "paragraphs" in data["data"][0]:
        return _read_squad(path, src)  # a file in SQuAD shape
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    return data


def _read_parquet(path: Path, src: SplitSource) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({err})") from None


def _read_trec(path: Path, src: SplitSource) -> list[dict]:
    """TREC's ``COARSE:fine question`` lines (latin-1 in the original release)."""
    rows = []
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            label, _, question = line.strip().partition(" ")
            coarse, colon, fine = label.partition(":")
            if not colon or not question:
                raise DataError(f"{path}:{lineno}: expected 'COARSE:fine question'")
            rows.append({"label": coarse, "fine_label": fine, "question": question})
    return rows


def _read_semeval(path: Path, src: SplitSource) -> list[dict]:
    """SemEval-2010 Task 8 release files: ``id<TAB>"sentence"``, then the label, a comment and a blank
    line. CRLF and LF both work. The sentence keeps its ``<e1>``/``<e2>`` tags."""
    rows = []
    with open(path, encoding="utf-8-sig", newline=None) as f:
        lines = [line.rstrip("\n") for line in f]
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        ident, tab, sentence = lines[i].partition("\t")
        if not tab or not ident.strip().isdigit() or i + 1 >= len(lines):
            raise DataError(f"{path}:{i + 1}: expected 'id<TAB>\"sentence\"' followed by a label line")
        sentence = sentence.strip()
        if len(sentence) > 1 and sentence[0] == sentence[-1] == '"':  # the file's wrapping pair only: a quote
            sentence = sentence[1:-1]  # inside the sentence may open or close it (""Just like real baseball," ...)
        if "<e1>" not in sentence or "<e2>" not in sentence:
            raise DataError(f"{path}:{i + 1}: sentence lacks <e1>/<e2> tags")
        rows.append({"id": ident.strip(), "sentence": sentence, "label": lines[i + 1].strip()})
        i += 2
        while i < len(lines) and lines[i].strip() and not lines[i].partition("\t")[0].strip().isdigit():
            i += 1  # Comment: lines
    return rows


def _read_fewrel(path: Path, src: SplitSource) -> list[dict]:
    """FewRel ``{relation: [{tokens, h: [name, id, [[positions]]], t: ...}]}``; the sentence gets
    ``<e1>``/``<e2>`` tags around the head and tail mentions."""
    data = _read_json_object(path)
    rows = []
    for relation, instances in data.items():
        for index, inst in enumerate(instances):
            try:
                tokens = list(inst["tokens"])
                head, tail = inst["h"][2][0], inst["t"][2][0]
            except (KeyError, IndexError, TypeError):
                raise DataError(f"{path}: relation {relation} instance {index} lacks tokens/h/t positions") from None
            for tag, pos in (("e1", head), ("e2", tail)):
                tokens[pos[0]] = f"<{tag}>" + tokens[pos[0]]
                tokens[pos[-1]] = tokens[pos[-1]] + f"</{tag}>"
            rows.append({"id": f"{relation}-{index}", "sentence": " ".join(tokens), "label": relation})
    return rows


def _read_boolq(path: Path, src: SplitSource) -> list[dict]:
    """BoolQ in SuperGLUE form. ``dev.jsonl`` rows (``answer`` "True"/"False", separate ``title``) get
    the passage as "title -- passage", like ``combined.jsonl``. From ``combined.jsonl`` only labeled
    rows are kept, minus those whose (question, passage) is in the ``dev.jsonl`` beside it."""
    rows = _read_jsonl(path, src)
    if rows and "answer" in rows[0]:
        return [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}" if r.get("title") else r["passage"],
                 "label": str(r["answer"])} for r in rows]
    dev = path.parent / "dev.jsonl"
    held = {(r["question"], r["passage"]) for r in _read_boolq(dev, src)} if dev.exists() and dev != path else set()
    return [{"id": f"boolq-{r.get('idx', i)}", "question": r["question"], "passage": r["passage"], "label": str(r["label"])}
            for i, r in enumerate(rows) if r.get("label") is not None and (r["question"], r["passage"]) not in held]


def _read_squad(path: Path, src: SplitSource) -> list[dict]:
    """SQuAD v1.1 JSON, one row per question, keeping articles whose index modulo 10 is in ``shards``."""
    data = _read_json_object(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected SQuAD JSON with a 'data' list of articles")
    rows = []
    for index, article in enumerate(data["data"]):
        if src.shards is not None and index % 10 not in src.shards:
            continue
        try:
            for p, paragraph in enumerate(article["paragraphs"]):
                context = paragraph["context"]
                for q, qa in enumerate(paragraph["qas"]):
                    answers = [a["text"] for a in qa.get("answers", [])]
                    # answer_start is optional (generative QA does not need it); without it, the first occurrence
                    starts = [a.get("answer_start", context.find(a["text"])) for a in qa.get("answers", [])]
                    rows.append({"id": qa.get("id", f"{index}-{p}-{q}"), "title": article.get("title", ""),
                                 "context": context, "question": qa["question"], "answers": answers,
                                 "answer_starts": starts})
        except (KeyError, TypeError) as err:
            raise DataError(f"{path}: article {index} ({article.get('title', '?') if isinstance(article, dict) else '?'}) "
                            f"is not SQuAD-shaped: no {err} (articles need paragraphs[].context and "
                            f"paragraphs[].qas[].question, answers[].text)") from None
    return rows


def _read_json_object(path: Path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


READERS: dict[str, Callable[[Path, SplitSource], list[dict]]] = {
    "csv": lambda p, s: _read_delimited(p, s, ","),
    "tsv": lambda p, s: _read_delimited(p, s, "\t"),
    "tsv_quoted": lambda p, s: _read_delimited(p, s, "\t", quoted=True),
    "json": _read_json,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "trec": _read_trec,
    "semeval": _read_semeval,
    "fewrel": _read_fewrel,
    "boolq": _read_boolq,
    "squad": _read_squad,
}


def _read_hub(src: SplitSource) -> list[dict]:
    import datasets

    name, _, config = src.hub.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=src.split or "train")
    except Exception as err:
        raise DataError(f"hub dataset '{src.hub}' split '{src.split}' could not be loaded: {err}") from None
    return list(ds)


def read_split(src: SplitSource, data_dir: str | Path, split: str, required: list[str]) -> list[dict]:
    """Read one split and apply column names, renames and the label map.

    Args:
        src: where the split lives.
        data_dir: base folder for relative paths.
        split: split name, used for row ids and in errors.
        required: columns every row must have after renaming (fields and ``label``).
    """
    if src.hub:
        rows, origin = _read_hub(src), f"hub dataset '{src.hub}'"
    else:
        path = Path(src.file).expanduser()
        relative = not path.is_absolute()
        if relative:
            path = Path(data_dir) / path
        if not path.is_file():
            hint = (f" (relative to data.init_args.data_dir={data_dir}; set it, or PROMPTLIT_DATA, to the folder holding "
                    f"the task's files)") if relative else ""
            raise DataError(f"{split} file not found: {path}{hint}")
        if path.stat().st_size == 0:
            raise DataError(f"{split} file is empty: {path}")
        fmt = src.format or path.suffix.lstrip(".").lower()
        if fmt not in READERS:
            raise DataError(f"{path}: unknown format '{fmt}'; known: {', '.join(READERS)}")
        try:
            rows, origin = READERS[fmt](path, src), str(path)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err}); re-save it as UTF-8") from None
    if not rows:
        raise DataError(f"{origin}: no rows")
    out = []
    for index, row in enumerate(rows):
        row = {src.rename.get(k, k): v for k, v in row.items()}
        if "label" in row and src.label_map:
            row["label"] = src.label_map.get(str(row["label"]), row["label"])
        row.setdefault("id", f"{split}-{index}")
        if row.get("answers") is not None:
            normalize_answers(row, origin)
        out.append(row)
    missing = [c for c in required if c not in out[0]]
    if missing:
        raise DataError(f"{origin}: missing column(s) {missing}; found {sorted(out[0])}. Map them with 'rename'.")
    for index, row in enumerate(out):  # every row, not just the first: a later gap would fail deep in batching
        missing = [c for c in required if row.get(c) is None]
        if missing:
            raise DataError(f"{origin}: row {index} (id {row['id']!r}) has no {', '.join(missing)}; "
                            f"every row needs {', '.join(required)}")
    return out


def normalize_answers(row: dict, origin: str) -> None:
    """A QA row's ``answers`` as a list of strings, in place. Accepts a list, one string (a csv
    column; a JSON list written into it is read as that list), or the hub's SQuAD shape
    ``{"text": [...], "answer_start": [...]}``, whose starts become ``answer_starts``."""
    answers = row["answers"]
    if isinstance(answers, dict):
        if "text" not in answers:
            raise DataError(f"{origin} (id {row['id']!r}): 'answers' is an object without 'text' "
                            f"(keys {sorted(answers)}); expected a list of answer strings or {{'text': [...], 'answer_start': [...]}}")
        if answers.get("answer_start") is not None and row.get("answer_starts") is None:
            row["answer_starts"] = list(answers["answer_start"])
        answers = answers["text"]
    if isinstance(answers, str):
        text = answers.strip()
        try:  # a JSON list of strings written into a csv cell
            parsed = json.loads(text) if text.startswith("[") else None
        except json.JSONDecodeError:
            parsed = None
        is_list = isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
        answers = parsed if is_list else [answers]
    if not isinstance(answers, (list, tuple)) or not all(isinstance(a, (str, int, float)) for a in answers):
        raise DataError(f"{origin} (id {row['id']!r}): 'answers' must be a list of answer strings, got {answers!r}")
    row["answers"] = [str(a) for a in answers if str(a).strip()]  # an empty cell is no answer (refused later)
    starts = row.get("answer_starts")
    if isinstance(starts, str):  # a csv column: "13" or "[13, 40]"
        try:
            starts = json.loads(starts) if starts.strip() else None
        except json.JSONDecodeError:
            pass  # still a string: refused below
    if isinstance(starts, int):
        starts = [starts]
    if starts is not None and not (isinstance(starts, (list, tuple)) and all(isinstance(x, int) for x in starts)):
        raise DataError(f"{origin} (id {row['id']!r}): 'answer_starts' must be character offsets (a list of integers), "
                        f"got {row['answer_starts']!r}")
    if starts is not None:
        row["answer_starts"] = list(starts)


def read_label_words(path: Path) -> dict[str, list[str]]:
    """A task's ``label_words_file``: a JSON object label -> name or [name, description, ...]
    (FewRel's ``pid2name.json``); the name is the label word."""
    if not path.is_file():
        raise DataError(f"label_words_file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"label_words_file {path}: not a UTF-8 JSON object ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"label_words_file {path}: expected a JSON object label -> name")
    return {str(k): [v if isinstance(v, str) else v[0]] for k, v in raw.items()}
