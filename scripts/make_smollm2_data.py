"""Build the data of the SmolLM2 recipes and the evidence study (recipes/smollm2/data/), deterministically.

    python scripts/make_smollm2_data.py            # writes recipes/smollm2/data/*.jsonl

- skill_train.jsonl / skill_test.jsonl: the skill, in chat turns. The user gives a date written out in words ("the
  fifth of March, 2021" or "March 5, 2021") and asks for it in ISO 8601; the assistant answers with the date alone
  ("2021-03-05"). SmolLM2-135M-Instruct does not do this out of the box (it rewrites the sentence, mixes up day and
  month, or pads wrong); it needs a month table, zero padding and a fixed order. Held-out dates never appear in
  training (no shared (year, month, day)), and the test rows use years outside the training years too.
- capitals.jsonl: the retention task, also in chat turns: "What is the capital of France?" -> "Paris". The base model
  answers most of these in a sentence; the score reads the first capital named in the answer (a regex over all of them).
- english.jsonl: general English for the perplexity retention measure: prose paragraphs of the Python documentation
  that ships with CPython (pydoc_data.topics), which is in neither training set.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
            "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth",
            "nineteenth", "twentieth", "twenty-first", "twenty-second", "twenty-third", "twenty-fourth",
            "twenty-fifth", "twenty-sixth", "twenty-seventh", "twenty-eighth"]
ASKS = [
    "Write this date in ISO 8601 format (YYYY-MM-DD): {d}",
    "Convert to ISO 8601 (YYYY-MM-DD): {d}",
    "Give the date {d} as YYYY-MM-DD.",
    "What is {d} in ISO 8601 date format?",
]
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid", "Japan": "Tokyo",
    "the United Kingdom": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest", "Thailand": "Bangkok",
    "South Korea": "Seoul", "Argentina": "Buenos Aires", "Peru": "Lima", "Mexico": "Mexico City", "Cuba": "Havana",
    "Kenya": "Nairobi", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "the Czech Republic": "Prague",
    "Iran": "Tehran", "Iraq": "Baghdad", "Afghanistan": "Kabul", "Indonesia": "Jakarta", "the Philippines": "Manila",
    "Vietnam": "Hanoi", "Chile": "Santiago", "Colombia": "Bogota", "Venezuela": "Caracas", "Ukraine": "Kyiv",
    "Romania": "Bucharest",
}
CAPITAL_ASKS = ["What is the capital of {c}?", "Which city is the capital of {c}?"]


def spoken(year: int, month: int, day: int, style: int) -> str:
    if style == 0:
        return f"{MONTHS[month - 1]} {day}, {year}"
    return f"the {ORDINALS[day - 1]} of {MONTHS[month - 1]}, {year}"


def skill_rows(dates: list[tuple[int, int, int]], rng: random.Random) -> list[dict]:
    rows = []
    for y, m, d in dates:
        ask = rng.choice(ASKS).format(d=spoken(y, m, d, rng.randrange(2)))
        rows.append({"messages": [{"role": "user", "content": ask},
                                  {"role": "assistant", "content": f"{y:04d}-{m:02d}-{d:02d}"}]})
    return rows


def date_split(n_train: int, n_test: int, rng: random.Random):
    train_years, test_years = range(1950, 2030), range(2030, 2100)
    seen: set[tuple[int, int, int]] = set()

    def draw(years, n):
        out = []
        while len(out) < n:
            t = (rng.choice(years), rng.randrange(1, 13), rng.randrange(1, 29))
            if t not in seen:
                seen.add(t)
                out.append(t)
        return out

    return draw(train_years, n_train), draw(test_years, n_test)


def capital_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": CAPITAL_ASKS[i % 2].format(c=c)},
                          {"role": "assistant", "content": cap}]}
            for i, (c, cap) in enumerate(CAPITALS.items())]


def capitals_pattern() -> str:
    """The first capital named in a text (longest names first, so 'Mexico City' wins over a shorter match)."""
    names = sorted(CAPITALS.values(), key=len, reverse=True)
    return r"\b(" + "|".join(re.escape(n) for n in names) + r")\b"


def english_rows(n: int, min_words: int = 60, max_words: int = 110) -> list[dict]:
    """Prose paragraphs from the Python documentation bundled with CPython (no code, no tables)."""
    from pydoc_data.topics import topics

    rows = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.splitlines()
            if not lines or any(ln.startswith((" ", "\t", ">>>", "*", "-", "+", "=")) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            words = text.split()
            if len(words) < min_words or not text[0].isupper() or not text.endswith("."):
                continue
            if sum(ch in "()[]{}_=*`'\"" for ch in text) > len(text) * 0.02:
                continue  # code-heavy prose
            rows.append({"text": " ".join(words[:max_words])})
    random.Random(0).shuffle(rows)
    return rows[:n]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {path} ({len(rows)} rows)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="recipes/smollm2/data")
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--english", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    rng = random.Random(args.seed)
    train, test = date_split(args.train, args.test, rng)
    write_jsonl(out / "skill_train.jsonl", skill_rows(train, rng))
    write_jsonl(out / "skill_test.jsonl", skill_rows(test, rng))
    write_jsonl(out / "capitals.jsonl", capital_rows())
    write_jsonl(out / "english.jsonl", english_rows(args.english))
    print(f"capitals regex: {capitals_pattern()}")


if __name__ == "__main__":
    main()
