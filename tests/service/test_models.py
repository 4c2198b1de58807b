"""Model registration: server paths checked (absolute, resolved, inside the roots, a real model) and GGUF
uploads; every refusal names the field and writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

from service.core.db.models import Model
from tests.service.factories import count, model_folder, register_model

GGUF = b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 56


def post_path(api, path, **extra):
    return api.client.post("/v1/models", headers=api.headers, json={"path": str(path), **extra})


def assert_path_refused(r, words: str) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    [err] = r.json()["errors"]
    assert err["field"] == "path" and words in err["message"], err


def test_register_mlx_folder_and_gguf_file(api):
    body = register_model(api, "tiny")
    assert body["format"] == "mlx" and body["source"] == "path" and body["name"] == "tiny"
    assert body["info"]["model_type"] == "llama" and body["info"]["num_hidden_layers"] == 2
    assert body["info"]["vocab_size"] == 512 and body["info"]["hidden_size"] == 64
    assert len(body["fingerprint"]) == 64
    assert api.client.get(f"/v1/models/{body['id']}", headers=api.headers).json() == body

    gguf = api.tmp / "models" / "small.gguf"
    gguf.write_bytes(GGUF)
    r = post_path(api, gguf)
    assert r.status_code == 201 and r.json()["format"] == "gguf" and r.json()["name"] == "small.gguf"
    assert r.json()["info"] == {"size_bytes": len(GGUF)}
    listed = api.client.get("/v1/models", headers=api.headers).json()
    assert [m["id"] for m in listed["data"]] == [r.json()["id"], body["id"]]


def test_fingerprint_changes_when_weights_change(api):
    first = register_model(api, "tiny")
    weights = Path(first["path"]) / "model.safetensors"
    weights.write_bytes(b"\1" * 256)
    second = post_path(api, first["path"]).json()
    assert second["fingerprint"] != first["fingerprint"]


def test_refused_paths(api):
    roots = api.tmp / "models"
    folder = model_folder(roots, "ok")
    outside = model_folder(api.tmp / "elsewhere", "secret")
    assert_path_refused(post_path(api, "models/ok"), "absolute")
    assert_path_refused(post_path(api, f"{roots}/../elsewhere/secret"), "..")
    assert_path_refused(post_path(api, f"{folder}/../ok"), "..")
    assert_path_refused(post_path(api, roots / "missing"), "no such file")
    assert_path_refused(post_path(api, outside), "outside the allowed model roots")
    (roots / "escape").symlink_to(outside)  # a link inside the root pointing out
    assert_path_refused(post_path(api, roots / "escape"), "outside the allowed model roots")
    half = roots / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    (half / "model.safetensors").symlink_to(outside / "model.safetensors")  # weights linked from outside
    assert_path_refused(post_path(api, half), "outside the allowed model roots")
    empty = roots / "empty"
    empty.mkdir()
    assert_path_refused(post_path(api, empty), "config.json")
    (roots / "notes.txt").write_text("hi")
    assert_path_refused(post_path(api, roots / "notes.txt"), "mlx-lm model folder")
    (roots / "fake.gguf").write_bytes(b"NOTGGUF")
    assert_path_refused(post_path(api, roots / "fake.gguf"), "not a GGUF file")
    bad_config = model_folder(roots, "bad-config")
    (bad_config / "config.json").write_text("{not json")
    assert_path_refused(post_path(api, bad_config), "not valid JSON")
    if os.geteuid() != 0:  # root reads anything
        unreadable = model_folder(roots, "locked")
        (unreadable / "model.safetensors").chmod(0)
        assert_path_refused(post_path(api, unreadable), "not readable")
    assert count(api, Model) == 0


def test_outside_the_roots_a_path_gets_one_answer_whether_it_exists_or_not(api):
    """No file-existence oracle: a missing and an existing path outside the roots are refused alike."""
    existing = model_folder(api.tmp / "elsewhere", "secret")
    answers = {
        post_path(api, p).json()["errors"][0]["message"].replace(str(p), "<path>")
        for p in (existing, api.tmp / "elsewhere" / "nothing-here", Path("/etc/passwd"), Path("/nope/x"))
    }
    assert len(answers) == 1 and "outside the allowed model roots" in answers.pop()
    # a dangling link inside a root, pointing out: the same answer as the other outside paths
    (api.tmp / "models" / "dangling").symlink_to(api.tmp / "elsewhere" / "nothing-here")
    assert_path_refused(post_path(api, api.tmp / "models" / "dangling"), "outside the allowed model roots")


def test_every_file_of_a_model_folder_must_lie_inside_the_roots(api):
    secret = api.tmp / "elsewhere" / "secret.json"
    secret.parent.mkdir(parents=True)
    secret.write_text('{"private": true}')
    folder = model_folder(api.tmp / "models", "leaky")
    (folder / "tokenizer.json").symlink_to(secret)  # the worker would read it as the tokenizer
    assert_path_refused(post_path(api, folder), "outside the allowed model roots")
    assert count(api, Model) == 0


def test_a_deeply_nested_config_is_a_422_naming_the_path(api):
    folder = model_folder(api.tmp / "models", "deep")
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_path_refused(post_path(api, folder), "nested too deeply")
    folder = model_folder(api.tmp / "models", "odd")
    (folder / "config.json").write_text('{"model_type": {"x": [1, 2]}, "num_hidden_layers": 2}')
    r = post_path(api, folder)
    assert r.status_code == 201 and r.json()["info"]["model_type"] is None


def test_without_roots_any_readable_path_is_allowed(database_url, tmp_path, redis_broker):
    from tests.service.conftest import running_api

    with running_api(database_url, tmp_path, redis_broker, model_roots=[]) as a:
        outside = model_folder(tmp_path / "anywhere", "m")
        r = a.client.post("/v1/models", headers=a.headers, json={"path": str(outside)})
        assert r.status_code == 201, r.text
        # but never the server's own storage: another project's uploaded GGUF lies there
        upload = a.client.post(
            "/v1/models", headers=a.headers, files={"file": ("m.gguf", GGUF, "application/octet-stream")}
        )
        assert upload.status_code == 201, upload.text
        with a.sessions() as session:
            stored = Path(session.get(Model, upload.json()["id"]).path)
        assert stored.is_file()
        for path in (
            stored,
            stored.parent,
            a.settings.artifact_root / "models" / "prj_other" / "x.gguf",
            a.settings.cache_dir / "teacher-caches" / "abc",
        ):
            r = a.client.post("/v1/models", headers=a.headers, json={"path": str(path)})
            assert r.status_code == 422 and "server's own storage" in r.json()["errors"][0]["message"], r.text


def test_body_validation_names_the_field(api):
    c = api.client
    r = c.post("/v1/models", headers=api.headers, json={"path": "/x", "weights": "y"})
    assert r.status_code == 422
    assert r.json()["errors"] == [{"field": "weights", "message": "Extra inputs are not permitted"}]
    r = c.post("/v1/models", headers=api.headers, json={"path": 5})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "path"
    r = c.post("/v1/models", headers=api.headers, json={"name": "x"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "path"
    r = c.post("/v1/models", headers={**api.headers, "Content-Type": "application/json"}, content=b'{"path": ')
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = c.post("/v1/models", headers={**api.headers, "Content-Type": "text/plain"}, content=b"/x")
    assert r.status_code == 415
    folder = model_folder(api.tmp / "models", "named")
    r = c.post("/v1/models", headers=api.headers, json={"path": str(folder), "name": "../../etc"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "name"
    assert count(api, Model) == 0


def test_gguf_upload(api):
    c = api.client
    r = c.post("/v1/models", headers=api.headers, files={"file": ("../../Tiny.gguf", GGUF)}, data={"name": "tiny q8"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == "gguf" and body["source"] == "upload" and body["name"] == "tiny q8"
    assert body["path"] is None and body["info"] == {"size_bytes": len(GGUF)}
    stored = list((Path(api.settings.artifact_root) / "models").rglob("*.gguf"))
    assert [p.name for p in stored] == [f"{body['id']}.gguf"] and stored[0].read_bytes() == GGUF

    r = c.post("/v1/models", headers=api.headers, files={"file": ("x.gguf", b"not a gguf")})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "file"
    r = c.post("/v1/models", headers=api.headers, files={"file": ("x.gguf", GGUF * 2000)})
    assert r.status_code == 413
    assert count(api, Model) == 1
    assert len([p for p in (Path(api.settings.artifact_root) / "models").rglob("*") if p.is_file()]) == 1
