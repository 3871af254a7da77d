"""/api/admin/dicom-nodes and the dicom-node-* commands."""
import pytest

NODE = {"aeTitle": "PACS1", "host": "10.0.0.5", "port": 104, "domain": "default",
        "allow": ["store", "echo"]}


@pytest.fixture
def node(client, auth_headers):
    res = client.post("/api/admin/dicom-nodes", json=NODE, headers=auth_headers["alice"])
    assert res.status_code == 201, res.get_json()
    return res.get_json()


def test_create_list_get_patch_delete(client, auth_headers, node):
    headers = auth_headers["alice"]
    assert node["allow"] == ["echo", "store"]  # the services' order
    assert [n["aeTitle"] for n in client.get("/api/admin/dicom-nodes", headers=headers).get_json()] \
        == ["PACS1"]
    res = client.patch("/api/admin/dicom-nodes/PACS1", json={"allow": ["find"], "host": ""},
                       headers=headers)
    assert res.status_code == 204
    got = client.get("/api/admin/dicom-nodes/PACS1", headers=headers).get_json()
    assert (got["allow"], got["host"], got["port"], got["domain"]) == (["find"], "", 104, "default")
    assert client.delete("/api/admin/dicom-nodes/PACS1", headers=headers).status_code == 204
    res = client.get("/api/admin/dicom-nodes/PACS1", headers=headers)
    assert res.status_code == 404 and "error" in res.get_json()


@pytest.mark.parametrize("who", ["bob", "guest"])
def test_needs_manage_server(client, auth_headers, who):
    for res in (client.get("/api/admin/dicom-nodes", headers=auth_headers[who]),
                client.post("/api/admin/dicom-nodes", json=NODE, headers=auth_headers[who]),
                client.delete("/api/admin/dicom-nodes/PACS1", headers=auth_headers[who])):
        assert res.status_code == 401  # as every admin route of CIRCUS answers it
        assert "error" in res.get_json()


@pytest.mark.parametrize("change", [
    {"aeTitle": "A" * 17}, {"aeTitle": ""}, {"aeTitle": " PACS"}, {"aeTitle": "PA\\CS"},
    {"port": 0}, {"port": 70000}, {"port": "104"}, {"allow": ["push"]},
    {"allow": ["echo", "echo"]}, {"host": "bad host"}, {"extra": 1}, {"domain": ""},
])
def test_invalid_nodes_are_refused(client, auth_headers, change):
    res = client.post("/api/admin/dicom-nodes", json={**NODE, **change},
                      headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."
    assert res.get_json()["validationErrors"]


def test_unknown_domain_and_duplicates_are_refused(client, auth_headers, node):
    headers = auth_headers["alice"]
    res = client.post("/api/admin/dicom-nodes", json={**NODE, "aeTitle": "X", "domain": "nope"},
                      headers=headers)
    assert res.status_code == 400 and "does not exist" in res.get_json()["error"]
    res = client.post("/api/admin/dicom-nodes", json=NODE, headers=headers)
    assert res.status_code == 409 and "already exists" in res.get_json()["error"]
    res = client.patch("/api/admin/dicom-nodes/PACS1", json={"aeTitle": "OTHER"}, headers=headers)
    assert res.status_code == 400 and res.get_json()["error"] == "The primary key cannot be modified."
    res = client.patch("/api/admin/dicom-nodes/NOPE", json={"port": 1}, headers=headers)
    assert res.status_code == 404
    res = client.delete("/api/admin/dicom-nodes/NOPE", headers=headers)
    assert res.status_code == 404


def test_cli_add_list_remove(app):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["dicom-node-add", "MODALITY", "--host", "127.0.0.1",
                                 "--port", "11113", "--domain", "default",
                                 "--allow", "echo,store,find"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(args=["dicom-node-list"])
    assert result.output.split() == ["MODALITY", "127.0.0.1", "11113", "default",
                                     "echo,store,find"]
    bad = runner.invoke(args=["dicom-node-add", "X", "--domain", "default", "--allow", "fly"])
    assert bad.exit_code != 0 and "allow" in bad.output
    bad = runner.invoke(args=["dicom-node-add", "Y", "--domain", "missing"])
    assert bad.exit_code != 0 and "does not exist" in bad.output
    assert runner.invoke(args=["dicom-node-remove", "MODALITY"]).exit_code == 0
    gone = runner.invoke(args=["dicom-node-remove", "MODALITY"])
    assert gone.exit_code != 0 and "not found" in gone.output
