"""deploy/compose/autoroute.lua and orthanc.json: which series Orthanc sends to ctp-node, and where.

1. The script's functions under a stand-alone Lua 5.4 with Orthanc's RestApiPost/DumpJson stubbed.
2. The script inside a real Orthanc (Debian package) configured from deploy/compose/orthanc.json,
   routing to a real `ctp-node serve` configured from deploy/compose/ctp-node.toml, on loopback.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ctp_node.config import load_settings
from tests.deploy.running import ORTHANC_JSON, SCRIPT, start_deployed_orthanc, start_node
from tests.deploy.tools import COMPOSE_DIR, need_program
from tests.peers import stop_process, wait_for

LUA_INSTALL = "apt-get install -y lua5.4"

# Lua literal tables of main DICOM tags, as Orthanc passes them to OnStableSeries; expected routing.
CASES = [
    ("perfusion", '{Modality="CT", SeriesDescription="CTP 4D Perfusion", Manufacturer="GE MEDICAL SYSTEMS"}', True),
    ("plain CT", '{Modality="CT", SeriesDescription="Head w/o", Manufacturer="SIEMENS"}', True),
    ("no description", '{Modality="CT", Manufacturer="Canon"}', True),
    ("no tags", "{}", False),
    ("MR", '{Modality="MR", SeriesDescription="DWI", Manufacturer="SIEMENS"}', False),
    (
        "node output",
        '{Modality="CT", SeriesDescription="1s SYNTHETIC - RESEARCH USE ONLY", Manufacturer="ctp-node"}',
        False,
    ),
    ("synthetic, lower case", '{Modality="CT", SeriesDescription="ctp 1s synthetic", Manufacturer="X"}', False),
    (
        "node manufacturer only",
        '{Modality="CT", SeriesDescription="renamed by PACS", Manufacturer=" CTP-NODE "}',
        False,
    ),
]

HARNESS = r"""
posts = {}
function DumpJson(value, keepStrings)
  local resources = table.concat(value['Resources'], ',')
  return 'Resources=' .. resources .. ';Asynchronous=' .. tostring(value['Asynchronous'])
end
function RestApiPost(uri, body) table.insert(posts, uri .. ' ' .. body); return '{"ID": "job"}' end
function print(...) end
dofile(arg[1])
io.write('MODALITY ', CTP_NODE_MODALITY, '\n')
for i, case in ipairs(CASES) do
  posts = {}
  local routed = CtpNodeShouldRoute(case[2])
  OnStableSeries('series-' .. i, case[2], {})
  io.write('CASE ', case[1], '|', tostring(routed), '|', table.concat(posts, ';'), '\n')
end
"""


def run_lua(tmp_path: Path, cases: list[tuple[str, str, bool]]) -> tuple[str, dict[str, tuple[bool, str]]]:
    lua = need_program("lua5.4", LUA_INSTALL)
    table = ",\n".join(f"{{{json.dumps(name)}, {tags}}}" for name, tags, _ in cases)
    harness = tmp_path / "harness.lua"
    harness.write_text(f"CASES = {{\n{table}\n}}\n{HARNESS}")
    run = subprocess.run([lua, str(harness), str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    modality, results = "", {}
    for line in run.stdout.splitlines():
        if line.startswith("MODALITY "):
            modality = line.split(" ", 1)[1]
        elif line.startswith("CASE "):
            name, routed, posts = line[5:].split("|")
            results[name] = (routed == "true", posts)
    return modality, results


def test_filter_and_request(tmp_path):
    modality, results = run_lua(tmp_path, CASES)
    assert set(results) == {name for name, _, _ in CASES}
    for index, (name, _, expected) in enumerate(CASES, start=1):
        routed, posts = results[name]
        assert routed is expected, name
        if expected:
            # One asynchronous store job for the whole series, to the node's modality entry.
            assert posts == f"/modalities/{modality}/store Resources=series-{index};Asynchronous=true", name
        else:
            assert posts == "", name


def test_lua_check_can_fail(tmp_path):
    """A harness that got the expectation wrong is caught: the filter really decides."""
    _, results = run_lua(tmp_path, [("mislabelled", '{Modality="CT", SeriesDescription="SYNTHETIC"}', True)])
    assert results["mislabelled"][0] is False


def test_modality_entry_is_the_node(tmp_path):
    modality, _ = run_lua(tmp_path, CASES[:1])
    orthanc = json.loads(ORTHANC_JSON.read_text())
    node = load_settings(COMPOSE_DIR / "ctp-node.toml")
    entry = orthanc["DicomModalities"][modality]
    assert (entry["AET"], entry["Port"], entry["Host"]) == (node.dicom.ae_title, node.dicom.port, "ctp-node")
    assert entry["AllowStore"] is True


# --- a real Orthanc with the script ------------------------------------------------------------------


def _ct_instance(path: Path, study: str, series: str, number: int, description: str, manufacturer: str, modality: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Routing^Test", "ROUTE1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.SeriesDescription, ds.Manufacturer = modality, description, manufacturer
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = bytes(32)
    ds.save_as(path, enforce_file_format=True)


def test_real_orthanc_routes_ct_but_not_the_node_output(tmp_path, s3):
    from pydicom.uid import generate_uid

    storescu = need_program("storescu", "apt-get install -y dcmtk (.ci/run installs it)")
    node, _, node_port = start_node(tmp_path, s3)
    orthanc = None
    try:
        orthanc = start_deployed_orthanc(tmp_path, node_port)
        study = generate_uid()
        series = {
            "perfusion": (generate_uid(), "CTP 4D Perfusion", "GE MEDICAL SYSTEMS", "CT"),
            "synthetic": (generate_uid(), "1s SYNTHETIC - RESEARCH USE ONLY", "ctp-node", "CT"),
            "mr": (generate_uid(), "DWI", "SIEMENS", "MR"),
        }
        files = []
        for name, (uid, description, manufacturer, modality) in series.items():
            for number in (1, 2):
                path = tmp_path / f"{name}-{number}.dcm"
                _ct_instance(path, study, uid, number, description, manufacturer, modality)
                files.append(str(path))
        # The calling AE title must be a registered modality: DicomAlwaysAllowStore is false.
        sent = subprocess.run(
            [storescu, "-aet", "CT_SCANNER1", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port), *files],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        # The compose configuration spools into the bucket: <prefix>spool/<study>/<series>/<sop>.dcm.
        spool = f"spool/{study}/"

        def spooled() -> dict[str, int]:
            counts: dict[str, int] = {}
            for key in s3.list_keys(spool):
                if key.endswith(".dcm"):
                    series_uid = key[len(spool) :].split("/")[0]
                    counts[series_uid] = counts.get(series_uid, 0) + 1
            return counts

        log = tmp_path / "orthanc.log"

        def routed_and_settled():
            decisions = [line for line in log.read_text().splitlines() if "ctp-node routing: series" in line]
            jobs = [orthanc.get(f"/jobs/{job}") for job in orthanc.get("/jobs")]
            done = jobs and all(job["State"] == "Success" for job in jobs)
            return len(decisions) == len(series) and done and spooled().get(series["perfusion"][0]) == 2 and jobs

        # Every series got its decision logged by the script, and the store jobs have finished.
        jobs = wait_for(routed_and_settled, timeout_s=30, what="Orthanc to route the stable CT series")
        assert [job["Type"] for job in jobs] == ["DicomModalityStore"], "one store job: the perfusion series only"
        text = log.read_text()
        assert "not routed: SeriesDescription says SYNTHETIC" in text and "not routed: modality MR is not CT" in text
        assert spooled() == {series["perfusion"][0]: 2}, "only the perfusion series reached the node"
        assert not (tmp_path / "data" / "spool" / study).exists(), "nothing spooled on the local disk"
    finally:
        if orthanc is not None:
            orthanc.stop()
        stop_process(node)
