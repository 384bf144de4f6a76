"""One bundle contract (lieq_export/bundle_contract.json) between backends/pte.py and the apps.

(a) every bundle file and manifest field the Kotlin (android_demo) and Swift (ios_demo)
    sources read is in the contract, in the right section (top level, layers[] entry,
    versions), and the contract's `app_reads` lists exactly what each app reads;
(b) the contract's files and fields are exactly what the pte exporter writes, with the
    JSON types the apps decode: fast, through the exporter's own manifest function on an
    un-lowered model, and (slow) on a real exported bundle.
Renaming a field on either side, or adding one to the exporter, fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import tiny_bundles

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = json.loads((ROOT / "lieq_export" / "bundle_contract.json").read_text())
KOTLIN = sorted((ROOT / "android_demo").rglob("*.kt"))
SWIFT = sorted((ROOT / "ios_demo").rglob("*.swift"))
SECTIONS = ("manifest", "layer", "versions")


def contract_fields(section: str) -> set[str]:
    if section == "manifest":
        return set(CONTRACT["manifest"]["required"]) | set(CONTRACT["manifest"]["optional"])
    return set(CONTRACT[section])


def contract_files() -> set[str]:
    return set(CONTRACT["files"]["required"]) | set(CONTRACT["files"]["optional"])


# ---- (a) what the apps read ----------------------------------------------------------------

# org.json getters: receiver.getX("key") / receiver.optX("key")
KT_ANY_GETTER = re.compile(r"\.(?:get|opt|has|isNull)\w*\(\s*\"([^\"]+)\"")
KT_GETTER = re.compile(r"\b(manifest|layer|versions|stats)\.(?:get|opt|has|isNull)\w*\(\s*\"([^\"]+)\"")
KT_FILE = re.compile(r"\bFile\(\s*\w+\s*,\s*\"([^\"]+)\"\s*\)")
SW_FILE = re.compile(r"appendingPathComponent\(\s*\"([^\"]+)\"\s*\)")
SW_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*:[^{]*\bDecodable\b[^{]*\{")
SW_CASE = re.compile(r"\bcase\s+(\w+)(\s*=\s*\"([^\"]*)\")?")
SW_SECTIONS = {"BundleManifest": "manifest", "LayerEntry": "layer", "Versions": "versions"}
FORMAT = re.compile(r"\"(lieq-export/pte-bundle/[^\"]*)\"")


def _read(paths) -> str:
    assert paths, "app sources not found"
    return "\n".join(p.read_text() for p in paths)


def kotlin_reads(src: str) -> dict[str, set[str]]:
    reads = {s: set() for s in ("files", *SECTIONS)}
    sectioned = set()
    for recv, key in KT_GETTER.findall(src):
        sectioned.add(key)
        if recv != "stats":  # the runner's own stats JSON, not the bundle
            reads[recv].add(key)
    # every JSON read must be on one of the named receivers, or we cannot tell its section
    unsectioned = set(KT_ANY_GETTER.findall(src)) - sectioned
    assert not unsectioned, f"Kotlin JSON reads on an unknown receiver: {sorted(unsectioned)}"
    reads["files"] = set(KT_FILE.findall(src))
    return reads


def _block(src: str, open_brace: int) -> str:
    depth = 0
    for i in range(open_brace, len(src)):
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        if depth == 0:
            return src[open_brace:i + 1]
    raise AssertionError("unbalanced braces")


def swift_reads(src: str) -> dict[str, set[str]]:
    reads = {s: set() for s in ("files", *SECTIONS)}
    for m in SW_STRUCT.finditer(src):
        body = _block(src, m.end() - 1)
        keys = re.search(r"enum\s+CodingKeys\s*:\s*String\s*,\s*CodingKey\s*\{", body)
        assert keys, f"struct {m.group(1)} decodes without explicit CodingKeys"
        assert m.group(1) in SW_SECTIONS, f"struct {m.group(1)}: which manifest section is it?"
        for name, explicit, key in SW_CASE.findall(_block(body, keys.end() - 1)):
            assert explicit, f"{m.group(1)}.CodingKeys.{name} has no explicit JSON key"
            reads[SW_SECTIONS[m.group(1)]].add(key)
    reads["files"] = set(SW_FILE.findall(src))
    return reads


@pytest.mark.parametrize("app", ["kotlin", "swift"])
def test_apps_read_only_contract_names(app):
    src = _read(KOTLIN if app == "kotlin" else SWIFT)
    reads = kotlin_reads(src) if app == "kotlin" else swift_reads(src)
    assert reads["files"] - contract_files() == set(), reads["files"]
    for s in SECTIONS:
        missing = reads[s] - contract_fields(s)
        assert not missing, f"{app} reads {s} fields the contract does not have: {sorted(missing)}"
    assert {k: sorted(v) for k, v in reads.items()} == CONTRACT["app_reads"], (
        f"{app} reads {reads}; update app_reads in lieq_export/bundle_contract.json")
    assert FORMAT.findall(src) == [CONTRACT["format"]]


def test_parsers_catch_a_foreign_field():
    """The regexes are the test: a renamed key must show up as a contract violation."""
    kt = 'val x = manifest.getInt("n_layer")\nval f = File(dir, "model.bin")'
    r = kotlin_reads(kt)
    assert r["manifest"] == {"n_layer"} and r["files"] == {"model.bin"}
    with pytest.raises(AssertionError, match="unknown receiver"):
        kotlin_reads('obj.getString("format")')
    sw = 'struct Versions: Decodable {\n let torch: String\n enum CodingKeys: String, CodingKey { case torch }\n}'
    with pytest.raises(AssertionError, match="no explicit JSON key"):
        swift_reads(sw)
    sw = 'struct LayerEntry: Decodable, Identifiable {\n enum CodingKeys: String, CodingKey {\n case a = "bits"\n }\n}'
    assert swift_reads(sw)["layer"] == {"bits"}


# ---- (b) what the exporter writes -------------------------------------------------------------

_TYPES = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
}


def has_type(v, spec: str) -> bool:
    for t in spec.split("|"):
        if t.startswith("array<"):
            if isinstance(v, list) and all(has_type(x, t[6:-1]) for x in v):
                return True
        elif _TYPES[t](v):
            return True
    return False


def check_manifest(man: dict) -> None:
    required, optional = CONTRACT["manifest"]["required"], CONTRACT["manifest"]["optional"]
    assert set(required) <= set(man), f"exporter no longer writes {sorted(set(required) - set(man))}"
    extra = set(man) - set(required) - set(optional)
    assert not extra, f"exporter writes fields the contract does not list: {sorted(extra)}"
    spec = {**required, **optional}
    for k, v in man.items():
        assert has_type(v, spec[k]), f"manifest[{k!r}] = {v!r} is not {spec[k]}"
    assert man["format"] == CONTRACT["format"]
    assert man["layers"] and len(man["layers"]) == man["n_layers"]
    for layer in man["layers"]:
        assert set(layer) == set(CONTRACT["layer"]), sorted(set(layer) ^ set(CONTRACT["layer"]))
        for k, v in layer.items():
            assert has_type(v, CONTRACT["layer"][k]), f"layers[][{k!r}] = {v!r} is not {CONTRACT['layer'][k]}"
    assert set(man["versions"]) == set(CONTRACT["versions"]), sorted(set(man["versions"]) ^ set(CONTRACT["versions"]))
    for k, v in man["versions"].items():
        assert has_type(v, CONTRACT["versions"][k])


def test_type_checker_rejects_mismatches():
    assert has_type([4, 8], "array<int>") and not has_type(4, "array<int>") and not has_type(True, "int")
    assert has_type(None, "string|null") and not has_type(3, "string|null")
    good = {k: None for k in CONTRACT["manifest"]["required"]}
    with pytest.raises(AssertionError):
        check_manifest({**good, "surprise": 1})


def test_contract_files_are_the_exporters_file_names():
    from lieq_export.backends import pte

    assert set(CONTRACT["files"]["required"]) == {pte.PTE_FILE, pte.TOKENIZER_FILE, pte.MANIFEST_FILE}
    assert set(CONTRACT["files"]["optional"]) == {pte.PLAN_FILE}


def test_exporter_manifest_function_matches_contract(tmp_path):
    """Fast: backends.pte builds the ExecuTorch model (no lowering) and its manifest function
    describes a folder holding the bundle's files."""
    from lieq_export.backends import pte

    model, tok, plan, q = tiny_bundles.tiny_model_and_tokenizer()
    built = pte.build_et_model(model, q, max_seq_len=tiny_bundles.MAX_SEQ_LEN)
    bos, eos = pte._special_ids(tok, model.config)
    for name in (pte.PTE_FILE, pte.TOKENIZER_FILE, pte.PLAN_FILE):
        (tmp_path / name).write_bytes(b"x")
    metadata = {"get_max_seq_len": built.max_seq_len, "get_n_layers": built.n_layers}
    man = pte._manifest(model, built, tmp_path, metadata, bos, eos, [], {}, 0.0, plan)
    man = json.loads(json.dumps(man))  # as the app sees it
    check_manifest(man)


@pytest.mark.slow
def test_exported_bundle_matches_contract(tmp_path_factory):
    """A real bundle: files on disk, manifest fields and types, and it generates text
    through ExecuTorch's TextLLMRunner (the runner behind the Android/iOS LLM APIs)."""
    from lieq_export.backends import pte

    bundle = tiny_bundles.pte_bundle(tmp_path_factory.getbasetemp())
    names = {p.name for p in bundle.iterdir()}
    assert set(CONTRACT["files"]["required"]) <= names <= contract_files(), names
    check_manifest(json.loads((bundle / "manifest.json").read_text()))
    assert pte.runner_generate(bundle, "the quick brown", max_new_tokens=6, temperature=0.0).strip()
