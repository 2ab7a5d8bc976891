"""The expert registry on a real PostgreSQL server: same schema and migrations as SQLite, shared
by several processes, a clear error for an unreachable database at start-up, and an outage
while serving that refuses registrations with 503 and keeps the expert set serving.

The server is Debian's ``postgresql`` package (``.ci/run`` installs it), started here: initdb
into a temporary folder, ``pg_ctl start`` on a free loopback port with password (SCRAM)
authentication, as the ``postgres`` user when the tests run as root. Without the binaries the
tests skip, saying how to install them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from coe.config import LoraExpert, ModelExpert, parse_config
from coe.errors import (
    ConfigError,
    DuplicateExpertError,
    ExpertNotFoundError,
    RegistryUnavailableError,
)
from coe.registry import ExpertRegistry, live_experts, open_registry, registry_path

PASSWORD = "s3cret-Pw"


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    return Path(which).resolve().parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1:``port`` (user ``coe``, password auth)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="coe-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = _free_port()
        # initdb and postgres refuse to run as root: run them as the postgres user.
        self.prefix = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.prefix:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run("initdb", "-D", str(self.data), "-U", "coe", "--auth=scram-sha-256", f"--pwfile={pwfile}",
                  "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        out = subprocess.run([*self.prefix, str(self.bindir / tool), *args], capture_output=True, text=True, check=False,
                             timeout=120)
        if out.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed: {out.stderr[-2000:]}\n{log}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -F"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://coe@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(host="127.0.0.1", port=self.port, user="coe", password=PASSWORD, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def close(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg():
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no pg_ctl): `apt-get install -y postgresql` (.ci/run does)")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _has_user("postgres")):
        pytest.skip("running as root without a postgres user to start PostgreSQL as")
    server = PostgresServer(bindir)
    yield server
    server.close()


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def db_url(pg) -> str:
    """A fresh, empty database on the server (its URL, without the password)."""
    return pg.url(pg.create_database())


def _config(**serving):
    return parse_config({"experts": [{"id": "base", "kind": "model", "model": "x"}], "serving": serving})


LORA = LoraExpert(id="math", base="base", adapter="/a/math", description="math", examples=["1+1?"])
MODEL = ModelExpert(id="m2", model="smollm2-135m-instruct", engine={"kind": "hf"}, resources={"num_gpus": 1})


def test_add_list_remove_persist_on_postgres(db_url):
    reg = ExpertRegistry(db_url, password=PASSWORD)
    assert reg.path is None and "***" in reg.location and PASSWORD not in reg.location
    reg.add(LORA)
    reg.add(MODEL)
    with pytest.raises(DuplicateExpertError):
        reg.add(LORA)
    again = ExpertRegistry(db_url, password=PASSWORD)  # a restart (or another replica)
    assert again.list() == [LORA, MODEL]
    assert again.get("m2").resources.num_gpus == 1
    again.remove("math")
    with pytest.raises(ExpertNotFoundError, match="m2"):
        again.remove("math")
    assert reg.ids() == ["m2"]
    assert reg.revision() == 3  # two adds and one remove; the failed ones changed nothing


def test_open_registry_takes_the_password_from_the_environment(db_url, monkeypatch):
    config = _config(registry_url=db_url, registry_password_env="MY_DB_PW")
    monkeypatch.setenv("MY_DB_PW", PASSWORD)
    reg = open_registry(config)
    reg.add(LORA)
    assert [e.id for e in live_experts(config, reg)] == ["base", "math"]
    with pytest.raises(ConfigError, match="registry_url is set"):
        registry_path(config)  # a server database has no file: nobody silently falls back to SQLite
    monkeypatch.setenv("MY_DB_PW", "wrong-pw")
    with pytest.raises(RegistryUnavailableError, match="password authentication failed") as err:
        open_registry(config)
    assert "wrong-pw" not in str(err.value) and "127.0.0.1" in str(err.value)
    monkeypatch.delenv("MY_DB_PW")
    with pytest.raises(RegistryUnavailableError, match=r"no password supplied.*\$MY_DB_PW, which is unset"):
        open_registry(config)


def test_unreachable_database_at_start_up_names_it_without_the_password():
    url = f"postgresql://coe@127.0.0.1:{_free_port()}/coe"
    with pytest.raises(RegistryUnavailableError) as err:
        ExpertRegistry(url, password=PASSWORD)
    message = str(err.value)
    assert f"coe:***@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/coe" in message and "unreachable" in message
    assert PASSWORD not in message and err.value.status_code == 503


def test_both_stores_run_the_same_schema_and_migrations(db_url, tmp_path):
    import sqlalchemy as sa

    from coe.registry_schema import LATEST

    ExpertRegistry(db_url, password=PASSWORD)
    ExpertRegistry(tmp_path / "r.sqlite")
    shapes = []
    for url in (db_url.replace("postgresql://coe@", f"postgresql+psycopg://coe:{PASSWORD}@"),
                f"sqlite:///{tmp_path / 'r.sqlite'}"):
        engine = sa.create_engine(url)
        inspector = sa.inspect(engine)
        shapes.append({t: [c["name"] for c in inspector.get_columns(t)] for t in sorted(inspector.get_table_names())})
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version FROM schema_version")).scalar_one() == LATEST
        engine.dispose()
    assert shapes[0] == shapes[1]
    assert shapes[0]["experts"] == ["id", "kind", "body", "created_at"]


def test_replicas_in_other_processes_see_each_others_registrations(db_url, tmp_path):
    """Two processes (as two ingress replicas on two nodes) share one PostgreSQL registry."""
    import sys

    ExpertRegistry(db_url, password=PASSWORD).add(LORA)
    code = (
        "import sys; from coe.registry import ExpertRegistry; from coe.config import LoraExpert; "
        "r = ExpertRegistry(sys.argv[1], password=sys.argv[2]); print(','.join(r.ids())); "
        "r.add(LoraExpert(id='other', base='base', adapter='/a/o'))"
    )
    out = subprocess.run([sys.executable, "-c", code, db_url, PASSWORD], capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "math"
    assert ExpertRegistry(db_url, password=PASSWORD).ids() == ["math", "other"]


def test_outage_while_serving_is_503_then_recovers(pg, db_url):
    reg = ExpertRegistry(db_url, password=PASSWORD)
    reg.add(LORA)
    pg.stop()
    try:
        for call in (lambda: reg.add(MODEL), lambda: reg.remove("math"), reg.list):
            with pytest.raises(RegistryUnavailableError, match="registrations and removals are refused") as err:
                call()
            assert err.value.status_code == 503 and PASSWORD not in err.value.message
            assert "127.0.0.1" not in err.value.message  # no internals in what the HTTP client sees
    finally:
        pg.start()
    reg.add(MODEL)  # the pool reconnects once the database is back
    assert reg.ids() == ["math", "m2"]


def test_service_keeps_serving_through_an_outage_and_refuses_registrations_with_503(
        pg, db_url, tiny_llama_dir, tiny_loras, tmp_path, monkeypatch):
    """The HTTP API on the real transformers engine (tiny llama) over a PostgreSQL registry."""
    from tests.helpers import LoopThread
    from tests.serving.serving_helpers import ADMIN, Harness, tiny_config_dict

    for src in tiny_loras:
        shutil.copytree(src, tmp_path / "adapters" / src.name)
    data = tiny_config_dict(tiny_llama_dir, tiny_loras, tmp_path, flaky=False, registry_url=db_url)
    del data["serving"]["registry_path"]
    config = parse_config(data)
    monkeypatch.setenv(config.serving.registry_password_env, PASSWORD)
    monkeypatch.setenv(config.serving.admin_key_env, ADMIN)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    lt = LoopThread()
    h = Harness(lt, config, tmp_path, open_registry(config))
    try:
        lora = {"id": "tiny-c", "base": "tiny", "adapter": str(tmp_path / "adapters" / "c")}
        assert h.request("POST", "/v1/experts", headers=auth, json=lora).status_code == 201
        pg.stop()
        try:
            r = h.request("POST", "/v1/experts", headers=auth, json={**lora, "id": "tiny-d"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable", r.text
            assert "registrations and removals are refused" in r.json()["error"]["message"]
            for model in ("tiny-c", "tiny-a", "tiny"):  # the current expert set keeps serving
                assert h.chat("hello", model=model).status_code == 200, model
            listed = {e["id"] for e in h.request("GET", "/v1/experts", headers=auth).json()}
            assert {"tiny", "tiny-a", "tiny-c"} <= listed and "tiny-d" not in listed
            assert h.request("DELETE", "/v1/experts/tiny-c", headers=auth).status_code == 503
        finally:
            pg.start()
        assert h.request("POST", "/v1/experts", headers=auth, json={**lora, "id": "tiny-d"}).status_code == 201
        assert open_registry(config).ids() == ["tiny-c", "tiny-d"]  # the refused removal removed nothing stored
    finally:
        h.close()
        lt.close()


def test_profiles_persist_and_go_with_the_expert_on_postgres(db_url):
    from tests.core.registry_profile_checks import check_profiles_persist_and_go_with_the_expert

    check_profiles_persist_and_go_with_the_expert(lambda: ExpertRegistry(db_url, password=PASSWORD))
