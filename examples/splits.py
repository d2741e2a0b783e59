"""Write a generated task's test/validation/train files; shared by the examples' generate.py scripts (stdlib only)."""
import json

SIZES = {"train": 320, "validation": 24, "test": 60}  # examples per split, for every example task


def write_splits(make_example, folder, sizes=SIZES):
    """Draw examples until every split is full, then write <split>.json for test, validation and train, in that order.

    An example whose (instruction, input) pair, or whose non-empty input, was drawn before is skipped, so no
    example and no context appears in two splits. Test comes first so that a larger training set leaves the
    test and validation sets unchanged.
    """
    pool, seen = [], set()
    while len(pool) < sum(sizes.values()):
        ex = make_example()
        keys = [(ex["instruction"], ex["input"])] + ([ex["input"]] if ex["input"] else [])
        if any(key in seen for key in keys):
            continue
        seen.update(keys)
        pool.append(ex)
    start = 0
    for split in ("test", "validation", "train"):
        rows = pool[start:start + sizes[split]]
        start += sizes[split]
        path = folder / f"{split}.json"
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {len(rows)} examples to {path}")
