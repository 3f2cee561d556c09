"""store.queries: project lookup and lineage edges."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.store import open_database
from shipyard.store.queries import add_edge, edges_of, project_id, project_names
from shipyard.store.tables import LineageEdgeRow, ProjectRow


def test_project_id_creates_once_and_finds_after(db_url: str) -> None:
    db = open_database(db_url)
    with db.transaction() as s:
        created = project_id(s, "alpha", create=True)
        assert project_id(s, "alpha", create=True) == created
    with db.read() as s:
        assert project_id(s, "alpha", create=False) == created
        names = project_names(s)
    assert names[created] == "alpha" and list(names.values()).count("alpha") == 1


def test_a_missing_project_is_not_found_in_reads(db_url: str) -> None:
    db = open_database(db_url)
    with pytest.raises(NotFoundError) as caught, db.read() as s:
        project_id(s, "ghost", create=False)
    assert caught.value.field == "project" and "ghost" in caught.value.message


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a..b", " a", "a."])
def test_a_bad_project_name_is_rejected_and_nothing_is_stored(db_url: str, name: str) -> None:
    db = open_database(db_url)
    with db.read() as s:
        before = s.scalars(select(ProjectRow.name)).all()
    with pytest.raises(InvalidInputError) as caught, db.transaction() as s:
        project_id(s, name, create=True)
    assert caught.value.field == "project" and "project" in caught.value.message
    with db.read() as s:
        assert s.scalars(select(ProjectRow.name)).all() == before


def test_edges_are_recorded_once_and_found_from_either_end(db_url: str) -> None:
    db = open_database(db_url)
    edge = {
        "source_kind": "dataset_version",
        "source_id": "dv1",
        "target_kind": "run",
        "target_id": "r1",
        "relation": "input",
    }
    with db.transaction() as s:
        add_edge(s, **edge)
        s.flush()
        add_edge(s, **edge)
        add_edge(
            s,
            source_kind="run",
            source_id="r1",
            target_kind="model_version",
            target_id="mv1",
            relation="output",
        )
    with db.transaction() as s:
        add_edge(s, **edge)
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(LineageEdgeRow)) == 2
        around_run = edges_of(s, kind="run", id="r1")
        from_dataset = edges_of(s, kind="dataset_version", id="dv1")
    assert [(e.source_id, e.target_id) for e in around_run] == [("dv1", "r1"), ("r1", "mv1")]
    assert [e.relation for e in from_dataset] == ["input"]
    assert around_run[0].created_at.utcoffset() is not None
