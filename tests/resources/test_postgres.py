"""The Dagster instance on a real Postgres (dagster-postgres), as in production.

`.ci/run` installs Debian's postgresql, starts it on loopback and sets
KAAPANA_TEST_POSTGRES_URL; without it (a laptop without Postgres) this test is skipped."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from kaapana_assets.environment import DEFAULT_VIEWER_URL
from kaapana_assets.ingest.assets import dicom_studies
from resources import ArchiveResource, LakeResource, ViewerResource

# slow tier (`make test-all`): a Postgres server
pytestmark = pytest.mark.slow

URL = os.environ.get("KAAPANA_TEST_POSTGRES_URL")


@pytest.fixture
def postgres_url() -> str:  # type: ignore[misc]
    if not URL:
        pytest.skip("KAAPANA_TEST_POSTGRES_URL not set (.ci/run starts Postgres and sets it)")
    # A fresh database per test, dropped afterwards.
    name = f"kaapana_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_materialization_on_postgres(postgres_url: str, tmp_path: Path, corpus: dict) -> None:
    home = tmp_path / "home"
    study = corpus["site-b"][0]
    (home / "incoming").mkdir(parents=True)
    for f in study.files:
        shutil.copy(f, home / "incoming" / f"{f.parent.name}-{f.name}")
    overrides = {"storage": {"postgres": {"postgres_url": postgres_url}}}
    with dg.instance_for_test(overrides=overrides) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions("studies", [study.study_uid])
        result = dg.materialize(
            [dicom_studies], partition_key=study.study_uid, instance=instance,
            resources={"lake": LakeResource(uri=str(home / "lake")), "archive": ArchiveResource(home=str(home)),
                       "viewer": ViewerResource(url=DEFAULT_VIEWER_URL)},
        )
        assert result.success
        event = instance.get_latest_materialization_event(dg.AssetKey("dicom_studies"))
        assert event is not None and event.asset_materialization.partition == study.study_uid  # type: ignore[union-attr]
        assert instance.get_dynamic_partitions("studies") == [study.study_uid]
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:  # it really is in Postgres
        count = conn.execute(sa.text("SELECT count(*) FROM event_logs WHERE asset_key LIKE '%dicom_studies%'")).scalar()
    engine.dispose()
    assert count and count > 0
