"""Procedural file trees: service logs, an access log, CSV exports, INI configs and a README per seed.

Layout (names vary with the :class:`TreeStyle` and the seed)::

    README.md
    config/<name>.ini ...                 3-4 sections that share key names (host, port, timeout, ...)
    data/<staff>.csv                      id plus name, dept, salary, age in a per-seed column order
    data/<sales>.csv                      date, region, product, units, revenue in a per-seed column order
    data/archive/*.csv, *.csv.bak         older exports
    logs/<service>.log ...                "2024-03-14 09:12:33 ERROR [db] connection timeout after 30s"
    logs/<access>.log                     Apache common log format
    logs/archive/*.log, *.log.1           rotated logs
    notes/todo.txt                        (some seeds)

Two styles draw from disjoint name pools (services, people, departments, regions, products, file names), so a
``heldout`` tree never equals a ``train`` tree. All randomness comes from the ``random.Random`` passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TreeStyle:
    """Name pools and sizes of one family of trees."""

    services: tuple[str, ...]
    access_log: str
    staff_csv: str
    sales_csv: str
    configs: tuple[str, ...]
    people: tuple[str, ...]
    departments: tuple[str, ...]
    regions: tuple[str, ...]
    products: tuple[str, ...]
    projects: tuple[str, ...]
    log_lines: tuple[int, int] = (18, 34)
    csv_rows: tuple[int, int] = (8, 14)


TRAIN_STYLE = TreeStyle(
    services=("api", "auth", "billing", "worker", "cache", "web"), access_log="access.log",
    staff_csv="employees.csv", sales_csv="sales.csv", configs=("app.ini", "database.ini"),
    people=("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj",
            "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yvonne"),
    departments=("Engineering", "Sales", "Marketing", "Support", "Finance"),
    regions=("north", "south", "east", "west"), products=("widget", "gadget", "gizmo", "doohickey"),
    projects=("atlas", "beacon", "comet", "delta"),
)

HELDOUT_STYLE = TreeStyle(
    services=("gateway", "indexer", "mailer", "payments", "search", "notifier"), access_log="requests.log",
    staff_csv="staff.csv", sales_csv="orders.csv", configs=("server.ini", "pipeline.ini"),
    people=("amara", "bjorn", "chen", "dmitri", "elif", "farah", "goran", "hana", "ines", "jonas", "kenji", "leila",
            "marek", "noor", "oskar", "priya", "quinn", "rosa", "soren", "tariq"),
    departments=("Research", "Operations", "Legal", "Design", "Security"),
    regions=("emea", "apac", "amer", "latam"), products=("sprocket", "flange", "bracket", "valve"),
    projects=("orion", "pulsar", "quasar", "vega"),
    log_lines=(24, 40), csv_rows=(10, 16),
)

LEVELS = ("INFO", "DEBUG", "WARN", "ERROR")
_LEVEL_WEIGHTS = (55, 15, 18, 12)
_MESSAGES = {
    "INFO": ("request completed in {ms}ms", "user {uid} logged in", "job {job} started", "job {job} finished",
             "cache hit ratio {pct}%", "connected to {host}"),
    "DEBUG": ("payload size {size} bytes", "heartbeat ok", "cache lookup key=user:{uid}"),
    "WARN": ("slow query took {ms}ms", "retrying request ({k}/3)", "disk usage at {pct}%",
             "deprecated config key '{key}'"),
    "ERROR": ("connection timeout after {sec}s", "failed to process job {job}", "permission denied: {path}",
              "upstream returned 503"),
}
LOG_KEYWORDS = ("timeout", "job", "retrying", "cache", "user", "slow", "failed", "disk")
_COMPONENTS = ("db", "http", "queue", "scheduler", "auth", "storage")
_CONFIG_KEYS = {
    "server": ("host", "port", "timeout", "workers"), "database": ("host", "port", "timeout", "name"),
    "cache": ("host", "port", "ttl", "enabled"), "logging": ("level", "path", "rotate"),
    "auth": ("enabled", "timeout", "provider"),
}


@dataclass
class World:
    """A generated tree and where its task-relevant files are (paths relative to the home directory)."""

    tree: dict
    service_logs: list[str] = field(default_factory=list)
    access_log: str = ""
    staff_csv: str = ""
    sales_csv: str = ""
    configs: list[str] = field(default_factory=list)

    def text(self, path: str) -> str:
        node = self.tree
        for name in path.split("/"):
            node = node[name]
        return node  # type: ignore[return-value]


def _log_message(rng: random.Random, level: str) -> str:
    template = rng.choice(_MESSAGES[level])
    return template.format(ms=rng.randint(12, 4800), uid=rng.randint(1000, 9999), job=rng.randint(100, 999),
                           pct=rng.randint(40, 99), host=f"10.0.{rng.randint(0, 9)}.{rng.randint(2, 250)}",
                           size=rng.randint(64, 65536), k=rng.randint(1, 3), key=rng.choice(("cache_ttl", "db_url")),
                           sec=rng.choice((5, 10, 30, 60)), path=f"/var/data/{rng.randint(1, 99)}.dat")


def service_log(rng: random.Random, n_lines: int, month: int) -> str:
    day, seconds = rng.randint(1, 28), rng.randint(0, 6 * 3600)
    lines = []
    for _ in range(n_lines):
        seconds += rng.randint(1, 400)
        level = rng.choices(LEVELS, _LEVEL_WEIGHTS)[0]
        h, m, s = seconds // 3600 % 24, seconds // 60 % 60, seconds % 60
        lines.append(f"2024-{month:02d}-{day:02d} {h:02d}:{m:02d}:{s:02d} {level} "
                     f"[{rng.choice(_COMPONENTS)}] {_log_message(rng, level)}")
    return "\n".join(lines) + "\n"


def access_log(rng: random.Random, n_lines: int) -> str:
    ips = [f"{rng.choice(('10.0', '192.168', '172.16'))}.{rng.randint(0, 20)}.{rng.randint(2, 254)}"
           for _ in range(rng.randint(3, 9))]
    paths = ("/", "/login", "/api/items", "/api/orders", "/static/app.js", "/health")
    seconds, lines = rng.randint(0, 3600), []
    for _ in range(n_lines):
        seconds += rng.randint(1, 90)
        status = rng.choices((200, 304, 404, 500), (75, 10, 10, 5))[0]
        lines.append(f'{rng.choice(ips)} - - [14/Mar/2024:{9 + seconds // 3600:02d}:{seconds // 60 % 60:02d}:'
                     f'{seconds % 60:02d} +0000] "{rng.choice(("GET", "GET", "POST"))} {rng.choice(paths)} '
                     f'HTTP/1.1" {status} {rng.randint(120, 9000)}')
    return "\n".join(lines) + "\n"


def _csv(columns: list[str], rows: list[dict]) -> str:
    return "\n".join([",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]) + "\n"


def staff_csv(rng: random.Random, style: TreeStyle) -> str:
    n = rng.randint(*style.csv_rows)
    names = rng.sample(style.people, n)
    salaries = rng.sample(range(40, 160), n)  # distinct, so highest and lowest are unique
    rows = [{"id": i + 1, "name": names[i], "dept": rng.choice(style.departments), "salary": salaries[i] * 1000,
             "age": rng.randint(22, 64)} for i in range(n)]
    return _csv(["id"] + rng.sample(["name", "dept", "salary", "age"], 4), rows)


def sales_csv(rng: random.Random, style: TreeStyle, n: int | None = None) -> str:
    rows = []
    for _ in range(n or rng.randint(*style.csv_rows)):
        units = rng.randint(1, 40)
        rows.append({"date": f"2024-03-{rng.randint(1, 28):02d}", "region": rng.choice(style.regions),
                     "product": rng.choice(style.products), "units": units, "revenue": units * rng.randint(3, 30)})
    rows.sort(key=lambda r: r["date"])
    return _csv(["date"] + rng.sample(["region", "product", "units", "revenue"], 4), rows)


def config_ini(rng: random.Random, project: str) -> str:
    lines = [f"# {project} configuration", "# edit with care; values are read at startup", ""]
    for section in rng.sample(sorted(_CONFIG_KEYS), rng.randint(3, 4)):
        lines.append(f"[{section}]")
        for key in _CONFIG_KEYS[section]:
            lines.append(f"{key} = {_config_value(rng, key, section, project)}")
        lines.append("")
    return "\n".join(lines)


def _config_value(rng: random.Random, key: str, section: str, project: str) -> str:
    values = {
        "host": f"{section}-{rng.randint(1, 9)}.{project}.internal", "port": str(rng.choice(range(2000, 9999, 7))),
        "timeout": str(rng.choice((5, 10, 15, 30, 45, 60, 90))), "workers": str(rng.randint(2, 32)),
        "name": f"{project}_{rng.choice(('prod', 'staging', 'dev'))}", "ttl": str(rng.choice((60, 300, 600, 3600))),
        "enabled": rng.choice(("true", "false")), "level": rng.choice(("debug", "info", "warning")),
        "path": f"/var/log/{project}/{section}.log", "rotate": rng.choice(("daily", "weekly")),
        "provider": rng.choice(("ldap", "oauth", "local")),
    }
    return values[key]


def readme(project: str, rng: random.Random) -> str:
    return (f"# {project}\n\nInternal tooling for the {project} service.\n\n## Layout\n\n"
            "- config/: INI configuration files\n- data/: CSV exports\n- logs/: service and access logs\n\n"
            f"Version: {rng.randint(0, 3)}.{rng.randint(0, 12)}.{rng.randint(0, 9)}\n")


def generate_world(rng: random.Random, style: TreeStyle) -> World:
    """A new tree drawn from ``rng`` with ``style``'s names and sizes."""
    project = rng.choice(style.projects)
    services = rng.sample(style.services, rng.randint(2, 3))
    logs: dict = {f"{s}.log": service_log(rng, rng.randint(*style.log_lines), 3) for s in services}
    logs[style.access_log] = access_log(rng, rng.randint(*style.log_lines))
    logs["archive"] = {name: service_log(rng, rng.randint(3, 8), 2)
                       for name in _archive_names(rng, services, ".log")}
    staff_name, sales_name = style.staff_csv, style.sales_csv
    data: dict = {staff_name: staff_csv(rng, style), sales_name: sales_csv(rng, style)}
    data["archive"] = {name: sales_csv(rng, style, n=rng.randint(3, 6))
                       for name in _archive_names(rng, [sales_name[:-4]], ".csv")}
    configs = rng.sample(style.configs, rng.randint(1, 2))
    tree: dict = {"README.md": readme(project, rng), "logs": logs, "data": data,
                  "config": {name: config_ini(rng, project) for name in configs}}
    if rng.random() < 0.5:
        tree["notes"] = {"todo.txt": "- rotate logs\n- check disk usage\n- update config\n"}
    return World(tree=tree, service_logs=[f"logs/{s}.log" for s in services],
                 access_log=f"logs/{style.access_log}", staff_csv=f"data/{staff_name}",
                 sales_csv=f"data/{sales_name}", configs=[f"config/{name}" for name in configs])


def _archive_names(rng: random.Random, stems: list[str], ext: str) -> list[str]:
    """Rotated file names: some end in ``ext`` (``api-2024-02-03.log``), some do not (``api.log.1``, ``.bak``)."""
    names = {f"{rng.choice(stems)}-2024-02-{rng.randint(1, 28):02d}{ext}" for _ in range(rng.randint(1, 4))}
    names |= {f"{rng.choice(stems)}{ext}.{rng.choice(('1', '2', 'bak'))}" for _ in range(rng.randint(0, 2))}
    return sorted(names)
