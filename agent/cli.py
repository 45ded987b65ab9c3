"""Command line: parse arguments, load config, call one function per subcommand.

Errors that are the user's to fix (config, data, broker) end as one line on stderr and an
exit status (2 for config), never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.errors import ConfigError, FedsiloError


def _process_start() -> float:
    """When this process really started (interpreter start-up included), for the
    start-to-first-training-step figure."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - only a measurement; fall back to import time
        return time.time()


def _cmd_config_check(args: argparse.Namespace) -> int:
    from agent.config import check_file

    kind = check_file(args.file)
    print(f"{args.file}: valid {kind} file")
    return 0


def _stop_on_signals(event) -> None:
    def handler(signum, _frame):
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _cmd_site_run(args: argparse.Namespace) -> int:
    from agent.config import load_site_config
    from agent.config.verify import verify_site
    from agent.federation.site import Site

    site = Site(verify_site(load_site_config(args.config)), backend=args.backend,
                process_start=_process_start())
    _stop_on_signals(site.stop_event)
    return site.run(exit_when_finished=not args.keep_running)


def _cmd_coordinator_run(args: argparse.Namespace) -> int:
    from agent.config import load_coordinator_config, load_plan
    from agent.config.verify import verify_coordinator
    from agent.federation.coordinator import Coordinator, Stopped, describe_final_auc

    coordinator = Coordinator(verify_coordinator(load_coordinator_config(args.config)),
                              load_plan(args.plan), backend=args.backend)
    _stop_on_signals(coordinator.stop_event)
    try:
        final = coordinator.run()
    except Stopped:
        print(f"coordinator stopped in round {coordinator.current_round}; state saved in "
              f"{coordinator.state_dir}, run again to resume", file=sys.stderr)
        return 0
    print(f"federation {coordinator.fed} finished: {describe_final_auc(final.get('eval', {}))}; "
          f"model in {coordinator.state_dir / 'model'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.imaging:
        from agent.demo.imaging import run_imaging_demo

        run_imaging_demo(sites=args.sites, rounds=args.rounds, seed=args.seed,
                         out=Path(args.out))
        return 0
    from agent.config import StrategySpec
    from agent.demo.run import demo_privacy, run_demo

    if args.dp_epsilon is not None and not 0.01 <= args.dp_epsilon <= 1000:
        raise ConfigError("fedsilo demo", "--dp-epsilon", "must be between 0.01 and 1000")
    run_demo(sites=args.sites, rounds=args.rounds, seed=args.seed, out=Path(args.out),
             strategy=StrategySpec(name=args.strategy), attack=args.attack,
             privacy=demo_privacy(args.secure, args.dp_epsilon, args.rounds))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from agent.ops.bench import format_report, run_bench

    for name in ("parameters", "sites", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError("fedsilo bench", f"--{name}", "must be at least 1")
    import kernels

    try:
        kernels.get_backend(args.backend)
    except ValueError as exc:  # an unknown or unusable backend
        raise ConfigError("fedsilo bench", "--backend", str(exc)) from None
    doc = run_bench(n=args.parameters, sites=args.sites, repeats=args.repeats,
                    backend=args.backend)
    print(json.dumps(doc) if args.json else format_report(doc))
    return 0


def _cmd_pki(args: argparse.Namespace) -> int:
    from agent.security.pki import PKI, WARN_DAYS, days_left

    d = Path(args.dir)
    if args.pki_command == "init":
        PKI.init(d, args.federation)
        print(f"{d}/ca.crt: new federation CA (its key stays in {d}/ca.key, mode 0600)")
        return 0
    pki = PKI(d)
    if args.pki_command == "issue":
        identity = args.role if args.role != "site" else args.id
        if args.role == "site" and identity is None:
            raise ConfigError("fedsilo pki issue site", "ID", "a site id is required")
        if args.role != "site" and args.id not in (None, args.role):
            raise ConfigError(f"fedsilo pki issue {args.role}", "ID",
                              f"the {args.role} identity is named {args.role!r}")
        if args.days < 1:
            raise ConfigError("fedsilo pki issue", "--days", "must be at least 1")
        issued = pki.issue(args.role, identity, days=args.days)
        print(f"{issued.cert} and {issued.key} (0600), valid until "
              f"{issued.not_after:%Y-%m-%d}; copy {d}/bundle-{identity}/ to that host")
        return 0
    if args.pki_command == "revoke":
        n = pki.revoke(args.id)
        print(f"{args.id}: {n} certificate(s) on {d}/crl.pem; give the broker the new CRL "
              f"(fedsilo broker-config again) and restart it")
        return 0
    if args.pki_command == "crl":
        until = pki.reissue_crl(args.days)
        print(f"{d}/crl.pem re-signed, valid until {until:%Y-%m-%d %H:%M} UTC; copy it to the "
              f"broker and the agents (they reload it within seconds)")
        return 0
    for identity, entry in sorted(pki.index["issued"].items()):  # list
        revoked = entry["current"] in pki.index.get("revoked", {})
        left = days_left(d / f"{identity}.crt")
        note = "REVOKED" if revoked else "EXPIRED" if left < 0 else \
            f"expires in {left:.0f} days" + (" — renew now" if left < WARN_DAYS else "")
        print(f"{identity:<24}{entry['role']:<13}{note}")
    return 0


def _cmd_broker_config(args: argparse.Namespace) -> int:
    from agent.security.brokerconf import (
        load_roster,
        parse_monitor_listener,
        write_broker_config,
    )
    from agent.security.pki import PKI

    monitor = (parse_monitor_listener(args.monitor_listener, args.port)
               if args.monitor_listener else None)
    conf = write_broker_config(PKI(Path(args.pki)), load_roster(Path(args.roster)), args.port,
                               Path(args.out), bind=args.bind,
                               hosts=tuple(args.host or ("localhost", "127.0.0.1")),
                               monitor_listener=monitor, websockets_port=args.websockets_port)
    print(f"{conf}: run it with `mosquitto -c {conf}`")
    if args.websockets_port:
        print(f"MQTT over secure WebSockets on port {args.websockets_port} (all interfaces; "
              f"sites: [broker] transport = \"websockets\")")
    if monitor:
        print(f"plaintext monitor listener {args.monitor_listener}: user monitor, password in "
              f"{Path(args.out) / 'monitor.password'}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from agent.config import BrokerConfig
    from agent.config.site import TLSFiles
    from agent.ops.statuscli import collect, table

    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError("fedsilo status", "--broker", f"{args.broker!r} is not HOST:PORT")
    tls = None
    given = [args.ca, args.cert, args.key]
    if any(given):
        if not all(given):
            raise ConfigError("fedsilo status", "--ca/--cert/--key", "give all three or none")
        for flag, path in zip(("--ca", "--cert", "--key"), given, strict=True):
            if not Path(path).is_file():
                raise ConfigError("fedsilo status", flag, f"file {path} does not exist")
        tls = TLSFiles(Path(args.ca), Path(args.cert), Path(args.key))
    broker = BrokerConfig(host=host, port=int(port), tls=tls)
    while True:
        snapshot = collect(broker)
        if args.json:
            print(json.dumps(snapshot, sort_keys=True))
        else:
            print(table(snapshot), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _cmd_report(args: argparse.Namespace) -> int:
    from agent.ops.report import write_report

    metrics = Path(args.metrics)
    if metrics.is_dir():
        metrics = metrics / "metrics.json"  # a coordinator state directory
    out = write_report(metrics, Path(args.out) if args.out else metrics.with_name("report.html"))
    print(out)
    return 0


def _cmd_ledger(args: argparse.Namespace) -> int:
    from agent.privacy.ledgercli import run_ledger

    return run_ledger(state_dir=args.state_dir, config=args.config, verify=args.verify,
                      as_json=args.json, since=args.since)


def _cmd_warm_cache(args: argparse.Namespace) -> int:
    from agent.ingest import dicom_native
    from agent.learn.warm import warm_kernels

    seconds = warm_kernels()
    dicom_native.warm()
    print(f"numba kernels compiled and cached in {seconds:.1f} s")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    import json

    from agent.config import ImagingSpec, load_plan
    from agent.ingest.pipeline import IngestPipeline
    from agent.ingest.quarantine import REASON_PATTERN

    modes = [args.path is not None, args.complete, args.requeue_quarantine]
    if sum(modes) != 1:
        raise ConfigError("fedsilo ingest", "PATH", "give one of a folder, file or DICOMDIR "
                          "to ingest, --complete or --requeue-quarantine")
    if args.reason and not args.requeue_quarantine:
        raise ConfigError("fedsilo ingest", "--reason", "goes with --requeue-quarantine")
    for reason in args.reason:
        if not REASON_PATTERN.fullmatch(reason):
            raise ConfigError("fedsilo ingest", "--reason", f"{reason!r} is not a reason code "
                              "(a folder name under STATE_DIR/quarantine, e.g. truncated)")
    imaging = (load_plan(args.plan).imaging if args.plan else None) or ImagingSpec()
    pipeline = IngestPipeline(Path(args.state), imaging, kernel_backend=args.backend)
    try:
        if args.path is not None:
            pipeline.ingest_tree(Path(args.path), progress=True)
        elif args.requeue_quarantine:
            n = pipeline.requeue_quarantine(args.reason)
            print(f"ingest: {n} quarantined files read again", file=sys.stderr)
        pipeline.complete_series(quiet_s=0.0)
        summary = pipeline.summary()
    finally:
        pipeline.close()
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0

    def reasons(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"

    print(f"stored {summary['stored']} files, {summary['duplicates']} duplicates")
    print(f"quarantined: {reasons(summary['quarantined'])} (in {Path(args.state) / 'quarantine'})")
    print(f"skipped: {reasons(summary['skipped'])}")
    print(f"series: {summary['series_complete']} complete, {summary['series_pending']} pending, "
          f"invalid: {reasons(summary['series_invalid'])}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from agent.learn.predict import run_predict, run_predict_study

    if args.clinical is not None:
        for flag, value in (("--out", args.out), ("--id-column", args.id_column)):
            if value is not None:
                raise ConfigError("fedsilo predict", flag, "goes with --table, not --clinical")
        return run_predict_study(Path(args.model), args.clinical,
                                 Path(args.study) if args.study else None, as_json=args.json)
    if args.study is not None or args.json:
        raise ConfigError("fedsilo predict", "--study" if args.study else "--json",
                          "goes with --clinical (one patient), not --table")
    return run_predict(Path(args.model), Path(args.table), Path(args.out) if args.out else None,
                       args.id_column)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from agent.ops.doctor import run_doctor

    return run_doctor(Path(args.config))


def _cmd_model(args: argparse.Namespace) -> int:
    if args.model_command == "export":
        from agent.learn.modelcli import run_export

        return run_export(Path(args.model), Path(args.out) if args.out else None,
                          encoded=args.encoded_inputs)
    from agent.learn.distribution import run_verify

    return run_verify(Path(args.path), config=Path(args.config) if args.config else None,
                      ca=Path(args.ca) if args.ca else None,
                      crl=Path(args.crl) if args.crl else None,
                      allow_unsigned=args.allow_unsigned)


def _cmd_hardware_show(args: argparse.Namespace) -> int:
    import json

    import kernels
    from agent.ops.hardware import (
        backend_for,
        default_profiles_dir,
        detect_host,
        load_profiles,
        matching_profiles,
        select_profile,
        threads_for,
    )

    directory = default_profiles_dir()
    profiles = load_profiles(directory)
    facts = detect_host()
    backends = kernels.available_backends()
    profile = select_profile(profiles, facts, args.profile, source="--profile")
    doc = {"host": facts.to_dict(), "backends": backends, "profiles_dir": str(directory),
           "requested": args.profile,
           "matching": [p.name for p in matching_profiles(profiles, facts)],
           "profile": {**profile.to_dict(), "threads_here": threads_for(profile, facts),
                       "backend_here": backend_for(profile, backends)}}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"host: {facts.summary()}")
    print("kernel backends:")
    for name, reason in backends.items():
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"profiles: {directory} (matching this host, best first: "
          f"{', '.join(doc['matching']) or 'none'})")
    chain = f", includes {' -> '.join(profile.includes)}" if profile.includes else ""
    print(f"profile: {profile.name} (requested {args.profile}{chain})")
    print(f"  {profile.description}")
    print(f"  match: {profile.match.to_dict() or 'any host'}")
    for key, value in doc["profile"]["settings"].items():
        print(f"  {key} = {value}")
    print(f"  here: backend {doc['profile']['backend_here']}, "
          f"{doc['profile']['threads_here']} threads")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsilo", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"fedsilo {__version__}")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="validate config and plan files")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a site config, coordinator config or plan")
    check.add_argument("file")
    check.set_defaults(func=_cmd_config_check)

    for role, func in (("site", _cmd_site_run), ("coordinator", _cmd_coordinator_run)):
        rp = sub.add_parser(role, help=f"run the {role} agent")
        rsub = rp.add_subparsers(dest=f"{role}_command", required=True)
        run = rsub.add_parser("run", help=f"run the {role} in the foreground")
        run.add_argument("--config", required=True, help=f"{role} config TOML")
        if role == "coordinator":
            run.add_argument("--plan", required=True, help="federation plan TOML")
        else:
            run.add_argument("--keep-running", action="store_true",
                             help="stay up after the federation finishes")
        run.add_argument("--backend", default="auto", help="kernel backend: auto, cpu, reference")
        run.set_defaults(func=func)

    demo = sub.add_parser("demo", help="a whole federation on this machine: embedded broker, "
                                       "coordinator, simulated hospitals")
    demo.add_argument("--sites", type=int, default=3, help="number of hospitals (default 3)")
    demo.add_argument("--rounds", type=int, default=15, help="federated rounds (default 15)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated cohorts")
    demo.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    demo.add_argument("--imaging", action="store_true",
                      help="also give every patient a head CT (DICOM), ingest it at each site "
                           "and compare tables alone with tables + CT")
    from agent.config import STRATEGIES
    from agent.demo.attack import ATTACKS

    demo.add_argument("--secure", action="store_true",
                      help="secure aggregation: the coordinator sees only the masked sum")
    demo.add_argument("--dp-epsilon", type=float, default=None, metavar="X",
                      help="client-level differential privacy with budget epsilon X (delta "
                           "1e-5); the demo prints the epsilon spent")
    demo.add_argument("--strategy", choices=STRATEGIES, default="fedavg",
                      help="how the coordinator combines updates (default fedavg; "
                           "docs/strategies.md)")
    demo.add_argument("--attack", choices=ATTACKS,
                      help="make the last hospital misbehave, to see what --strategy does")
    demo.set_defaults(func=_cmd_demo)

    ingest = sub.add_parser("ingest", help="ingest a folder of DICOM files (or a DICOMDIR) "
                                           "into a site's image store, once")
    ingest.add_argument("path", nargs="?", help="folder tree, single file or DICOMDIR")
    ingest.add_argument("--complete", action="store_true",
                        help="no PATH: complete the series already waiting in --state (e.g. "
                             "received by the listener) on --plan's grid")
    ingest.add_argument("--requeue-quarantine", action="store_true",
                        help="no PATH: ingest again the files in STATE_DIR/quarantine (e.g. "
                             "truncated ones whose copy has since finished)")
    ingest.add_argument("--reason", action="append", default=[],
                        help="with --requeue-quarantine: only files quarantined for this "
                             "reason (repeatable; default every reason)")
    ingest.add_argument("--state", required=True, help="the site's state directory")
    ingest.add_argument("--plan", help="federation plan TOML whose [imaging] grid to use "
                                       "(default: the built-in grid)")
    ingest.add_argument("--backend", default="auto", help="kernel backend: auto, cpu, reference")
    ingest.add_argument("--json", action="store_true", help="print the summary as one JSON "
                                                            "object")
    ingest.set_defaults(func=_cmd_ingest)

    pr = sub.add_parser("predict", help="score a table with a saved model (probability per "
                                        "row, AUC when the table has the outcome column), or "
                                        "one patient's row and study with the exported model")
    pr.add_argument("--model", required=True, help="model directory (<state_dir>/model/); "
                                                   "with --clinical also a model.onnx file")
    what = pr.add_mutually_exclusive_group(required=True)
    what.add_argument("--table", help="CSV or Parquet table, columns as in the plan")
    what.add_argument("--clinical", metavar="ROW", help="one patient: name=value,... for every "
                                                         "feature, or a CSV file with one row")
    pr.add_argument("--study", help="with --clinical: the patient's DICOM study folder "
                                    "(imaging models)")
    pr.add_argument("--out", help="CSV file to write (default: stdout, summary on stderr)")
    pr.add_argument("--id-column", help="key rows by this column (default: row number)")
    pr.add_argument("--json", action="store_true", help="with --clinical: one JSON object")
    pr.set_defaults(func=_cmd_predict)

    doc = sub.add_parser("doctor", help="check this site's path to the broker step by step "
                                        "(certificate, DNS, TCP, proxy, TLS, then the MQTT "
                                        "session and ACL while the agent is stopped); the "
                                        "first failure in words to act on")
    doc.add_argument("--config", required=True, help="the site config")
    doc.set_defaults(func=_cmd_doctor)

    mo = sub.add_parser("model", help="export the federation's model to ONNX, verify a "
                                      "received one")
    mo_sub = mo.add_subparsers(dest="model_command", required=True)
    ex = mo_sub.add_parser("export", help="write model.onnx (with its model card) from a model "
                                          "directory")
    ex.add_argument("--model", required=True, help="model directory: model.json + model.f32")
    ex.add_argument("--out", help="ONNX file to write (default: <model>/model.onnx)")
    ex.add_argument("--encoded-inputs", action="store_true",
                    help="one float input of encoded columns instead of one input per feature")
    ver = mo_sub.add_parser("verify", help="check a received model's signature and digest "
                                           "before use")
    ver.add_argument("path", help="model directory (model.onnx + model.manifest.json)")
    ver.add_argument("--config", help="site config whose [identity] names the federation CA")
    ver.add_argument("--ca", help="federation CA certificate (instead of --config)")
    ver.add_argument("--crl", help="the federation CRL (with --ca)")
    ver.add_argument("--allow-unsigned", action="store_true",
                     help="accept an unsigned model (the demo without a PKI)")
    mo.set_defaults(func=_cmd_model)

    hw = sub.add_parser("hardware", help="host facts, kernel backends and hardware profile")
    hw_sub = hw.add_subparsers(dest="hardware_command", required=True)
    show = hw_sub.add_parser("show", help="what this host offers and which profile is chosen")
    show.add_argument("--profile", default="auto", help="profile name, or auto (default)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_cmd_hardware_show)

    bench = sub.add_parser("bench", help="measure this host: memory bandwidth and the "
                                         "codec/aggregation kernels against numpy")
    bench.add_argument("--parameters", type=int, default=10_000_000,
                       help="model size in parameters (default 10,000,000)")
    bench.add_argument("--sites", type=int, default=10, help="updates aggregated (default 10)")
    bench.add_argument("--repeats", type=int, default=5, help="runs per figure; medians")
    bench.add_argument("--backend", default="auto", help="kernel backend: auto, cpu, gpu, "
                                                         "reference")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=_cmd_bench)

    pki = sub.add_parser("pki", help="the federation's certificates: CA, identities, revocation")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_sub.add_parser("init", help="create the federation CA in --dir")
    init.add_argument("--dir", required=True, help="PKI directory (keep it offline if you can)")
    init.add_argument("--federation", help="bind the CA to this federation id (broker configs "
                                           "for another federation are then refused)")
    init.set_defaults(func=_cmd_pki)
    issue = pki_sub.add_parser("issue", help="key + certificate for a site, the coordinator or "
                                             "the monitoring identity")
    issue.add_argument("role", choices=("site", "coordinator", "monitor"))
    issue.add_argument("id", nargs="?", help="the site id (sites only)")
    issue.add_argument("--dir", required=True, help="PKI directory")
    issue.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    issue.set_defaults(func=_cmd_pki)
    revoke = pki_sub.add_parser("revoke", help="put an identity's certificates on the CRL")
    revoke.add_argument("id")
    revoke.add_argument("--dir", required=True, help="PKI directory")
    revoke.set_defaults(func=_cmd_pki)
    crl = pki_sub.add_parser("crl", help="re-sign the CRL with a new nextUpdate (nothing "
                                         "revoked)")
    crl.add_argument("--dir", required=True, help="PKI directory")
    crl.add_argument("--days", type=int, default=365, help="validity of the new CRL")
    crl.set_defaults(func=_cmd_pki)
    plist = pki_sub.add_parser("list", help="issued identities and when they expire")
    plist.add_argument("--dir", required=True, help="PKI directory")
    plist.set_defaults(func=_cmd_pki)

    bc = sub.add_parser("broker-config", help="write a Mosquitto config, ACL and broker "
                                              "certificate for the federation's roster")
    bc.add_argument("--pki", required=True, help="PKI directory (fedsilo pki init)")
    bc.add_argument("--roster", required=True, help='TOML: federation = "id", sites = [...]')
    bc.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    bc.add_argument("--out", required=True, help="directory for mosquitto.conf and its files")
    bc.add_argument("--bind", default="0.0.0.0", help="listen address (default all)")
    bc.add_argument("--host", action="append", default=None,
                    help="name or IP clients use to reach the broker (repeatable; default "
                         "localhost and 127.0.0.1)")
    bc.add_argument("--monitor-listener", metavar="ADDRESS:PORT",
                    help="also a read-only plaintext listener for monitoring agents without "
                         "client certificates (user monitor; default off; docs/monitoring.md)")
    bc.add_argument("--websockets-port", type=int, metavar="PORT",
                    help="also MQTT over secure WebSockets on PORT (e.g. 443), same certificates "
                         "and ACL, for sites behind HTTPS-only proxies")
    bc.set_defaults(func=_cmd_broker_config)

    st = sub.add_parser("status", help="every site and coordinator from the broker's retained "
                                       "status topics")
    st.add_argument("--broker", required=True, help="HOST:PORT of the MQTT broker")
    st.add_argument("--ca", help="TLS: the federation CA certificate")
    st.add_argument("--cert", help="TLS: a certificate to connect with (e.g. the monitor's)")
    st.add_argument("--key", help="TLS: its key")
    st.add_argument("--json", action="store_true", help="one JSON object per snapshot")
    st.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                    help="refresh every SECONDS until interrupted")
    st.set_defaults(func=_cmd_status)

    rep = sub.add_parser("report", help="a self-contained HTML report of a federation's rounds")
    rep.add_argument("metrics", help="the coordinator's metrics.json (or its state directory)")
    rep.add_argument("--out", help="HTML file to write (default: report.html beside it)")
    rep.set_defaults(func=_cmd_report)

    led = sub.add_parser("ledger", help="the site's privacy ledger: everything that left it, "
                                        "hash-chained (docs/privacy.md)")
    where = led.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", help="the site's state directory")
    where.add_argument("--config", help="the site config TOML (its state_dir)")
    led.add_argument("--verify", action="store_true",
                     help="check the chain: exit 0 when intact, 1 naming the first bad entry")
    led.add_argument("--json", action="store_true",
                     help="the entries as recorded, one JSON object a line (with --verify: "
                          "the check as one JSON object)")
    led.add_argument("--since", type=int, metavar="ROUND",
                     help="only entries of round ROUND and later")
    led.set_defaults(func=_cmd_ledger)

    warm = sub.add_parser("warm-cache", help="compile the Numba kernels into the cache (run at "
                                             "install, with NUMBA_CACHE_DIR set as the service)")
    warm.set_defaults(func=_cmd_warm_cache)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent.ops.logsetup import setup_logging

    setup_logging(args.log_level)
    try:
        from agent.learn.kinds import load_plugins, model_kind

        for name in load_plugins():
            logging.getLogger("agent").info("model kind %s from an installed package: %s",
                                            name, model_kind(name).summary)
        return args.func(args)
    except FedsiloError as exc:
        print(f"fedsilo: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
