"""ptq_adversary.audit.report: the markdown summary lists only vulnerable examples (at most
`top`), and examples.csv states each example's status and rank."""

from ptq_adversary import audit
from tests.audit import cases


def _table_indices(markdown: str) -> list[int]:
    """The example indices in the markdown's "most vulnerable" table."""
    section = markdown.split("most vulnerable", 1)[1].split("Files:", 1)[0]
    return [
        int(line.split("|")[1])
        for line in section.splitlines()
        if line.startswith("|") and line.split("|")[1].strip().isdigit()
    ]


def test_markdown_lists_only_vulnerable_examples(tmp_path):
    r = cases.hand_built_result(cases.FP, cases.VUL, cases.LOSS)
    audit.write_report(r, str(tmp_path), top=20)
    md = (tmp_path / "summary.md").read_text()
    assert _table_indices(md) == [3, 0]
    assert "The 2 most vulnerable examples" in md
    # ...and at most `top` of them, saying how many there are.
    audit.write_report(r, str(tmp_path), top=1)
    md = (tmp_path / "summary.md").read_text()
    assert _table_indices(md) == [3] and "of 2 vulnerable" in md


def test_markdown_says_so_when_nothing_is_vulnerable(tmp_path):
    r = cases.hand_built_result(cases.FP, [False] * 6, cases.LOSS)
    audit.write_report(r, str(tmp_path))
    md = (tmp_path / "summary.md").read_text()
    assert _table_indices(md) == []
    assert "No vulnerable examples" in md and "| index |" not in md


def test_examples_csv_states_each_examples_status(tmp_path):
    r = cases.hand_built_result(cases.FP, cases.VUL, cases.LOSS)
    audit.write_report(r, str(tmp_path))
    rows = [line.split(",") for line in (tmp_path / "examples.csv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    col = {name: header.index(name) for name in ("index", "rank", "status", "fp_correct")}
    status = {int(row[col["index"]]): row[col["status"]] for row in body}
    assert status == {
        0: "vulnerable",
        1: "robust",
        2: "wrong_in_fp",
        3: "vulnerable",
        4: "wrong_in_fp",
        5: "robust",
    }
    assert [int(row[col["rank"]]) for row in body] == [1, 2, 4, 0, 5, 3]
