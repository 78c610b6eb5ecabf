"""ObjectStates: state, shard and written-status hash per projection slot (pure)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from cim_place.cluster.controller.object_states import ObjectStates
from cim_place.placement.status import OBJECT_STATES


def test_states_are_counted_per_state_and_per_shard() -> None:
    states = ObjectStates()
    states.note(0, "placed", 0)
    states.note(5000, "degraded", 1)  # far beyond the first room: the columns grow
    states.note(7, "placed", 1)
    assert states.state(5000) == "degraded" and states.state(3) is None
    assert states.state(10**6) is None
    assert states.counts() == {**dict.fromkeys(OBJECT_STATES, 0), "placed": 2, "degraded": 1}
    assert states.counts(1)["placed"] == 1 and states.counts(1)["degraded"] == 1
    assert list(states.slots_of_shard(1)) == [7, 5000]
    assert len(states) == 3
    states.note(7, "lost", 1)  # a later reconcile replaces the state
    assert states.counts(1)["lost"] == 1 and states.counts(1)["placed"] == 0
    states.clear(0)
    assert states.state(0) is None and len(states) == 2
    states.clear_slots(states.slots_of_shard(1))
    assert len(states) == 0


def test_the_written_hash_is_kept_until_forgotten() -> None:
    states = ObjectStates()
    assert states.written(12) == 0
    states.set_written(12, -77)
    states.note(3, "placed")
    assert states.written(12) == -77
    states.clear(12)
    assert states.written(12) == 0
    states.set_written(3, 5)
    states.forget_written()  # a new term
    assert states.written(3) == 0 and states.state(3) == "placed"


@given(
    st.lists(
        st.tuples(
            st.integers(0, 3000), st.sampled_from(OBJECT_STATES), st.integers(0, 3), st.booleans()
        ),
        max_size=200,
    )
)
def test_the_columns_agree_with_a_dict(steps: list[tuple[int, str, int, bool]]) -> None:
    states = ObjectStates()
    model: dict[int, tuple[str, int]] = {}
    for slot, state, shard, forget in steps:
        if forget:
            states.clear(slot)
            model.pop(slot, None)
        else:
            states.note(slot, state, shard)
            model[slot] = (state, shard)
    by_shard = states.counts_by_shard(states.noted_slots(), 4)
    wanted: int | None
    for wanted in [None, 0, 1, 2, 3]:
        expected: dict[str, int] = dict.fromkeys(OBJECT_STATES, 0)
        for state, of in model.values():
            if wanted is None or of == wanted:
                expected[state] += 1
        assert states.counts(wanted) == expected
        if wanted is not None:
            assert by_shard[wanted] == expected
    assert sorted(model) == states.noted_slots().tolist()
    for index in range(4):
        assert sorted(s for s, (_, of) in model.items() if of == index) == list(
            states.slots_of_shard(index)
        )
    assert np.array_equal(
        states.shards_of(states.noted_slots()), [model[s][1] for s in sorted(model)]
    )
