"""``nvila-edge export`` and ``nvila-edge verify`` (registered by nvila_edge.cli)."""

from __future__ import annotations


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="calibrated directory → deployment bundle (cpu | gguf | cuda | tensorrt | torch | all)")
    e.add_argument("calibrated", help="output of `nvila-edge calibrate`")
    e.add_argument("-o", "--output", required=True, help="bundle directory (written atomically)")
    e.add_argument("--target", default="cpu", help="cpu, gguf (with cpu: cpu,gguf), cuda, tensorrt, torch, a comma-separated list, or all")
    e.add_argument("--engines", choices=("auto", "build", "skip"), default="auto",
                   help="GPU engines: build when TensorRT is installed (auto), require it (build), or skip")
    e.add_argument("--embeddings-dtype", choices=("float16", "float32", "int8"), default="float16")
    e.add_argument("--lm-head", choices=("int8", "int4"), default=None,
                   help="gguf target's LM head: int8 (Q8_0, default) or int4 (Q4_0, fewer bytes a token)")
    e.add_argument("--sign", metavar="KEY", help="Ed25519 private key (PEM): also write manifest.sig ([sign] extra)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="re-hash a bundle and check its format version and producer versions")
    v.add_argument("bundle")
    v.add_argument("--key", help="Ed25519 public key (PEM): the bundle's manifest.sig must match it")
    v.set_defaults(func=cmd_verify)


def cmd_export(args) -> int:
    import logging

    from .writer import export_bundle

    logging.getLogger("modelopt").setLevel(logging.ERROR)
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    result = export_bundle(args.calibrated, args.output, targets, engines=args.engines,
                           embeddings_dtype=args.embeddings_dtype, lm_head=args.lm_head, sign_key=args.sign)
    print(result)
    from nvila_edge.bundle import Bundle

    _describe(Bundle.open(args.output, verify=False))  # export_bundle already re-hashed what it wrote
    return 0


def cmd_verify(args) -> int:
    from nvila_edge.bundle import Bundle

    b = Bundle.open(args.bundle, key=args.key)  # raises BundleError (exit 2) on any mismatch
    _describe(b)
    if args.key:
        print(f"  signature: OK (manifest.sig, key {args.key})")
    return 0


def _describe(b) -> None:
    from nvila_edge.bundle import producer_versions

    m = b.manifest
    print(f"{b.path}: OK — format {m['format_version']}, model {b.config.name}, {len(m['files'])} files verified")
    for name in b.targets:
        t = b.target(name)
        print(f"  target {name:9s} precision {t.get('precision')}  limits {t.get('limits')}")
        eng = t.get("engines")
        if isinstance(eng, dict) and eng.get("built") is False:
            print(f"    engines not built: {eng['reason']}")
    now = producer_versions()
    for pkg, ver in (m.get("producer") or {}).items():
        if ver and now.get(pkg) and now[pkg].split(".")[:2] != ver.split(".")[:2]:
            print(f"  note: made with {pkg} {ver}, this machine has {now[pkg]}")
