import pytest

from fedpeft.causal.answers import final_number


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("#### 70,000", "70000"),
        ("so the answer is $1,200.00 in total", "1200"),
        ("first 3 then 4.50", "4.5"),
        ("#### -7 apples, not 9", "-7"),
        ("the answer is 5. #### 6", "6"),
        ("no number here", None),
        ("#### none", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number
