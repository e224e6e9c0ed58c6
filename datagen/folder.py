"""A pipeline folder: ``pipeline.py`` + ``config.yaml`` + ``prompts/``, loaded by one rule.

``pipeline.py`` exposes the pipeline in one of two ways:

- ``build(pipeline, **params)``: receives a :class:`DataGenerationPipeline` already made
  from the folder's ``config.yaml`` (with any overrides, e.g. ``--set``), adds its steps and
  returns it (returning None means "the same one");
- a module-level ``pipeline`` object (overrides are applied to a copy of it).

and optionally ``data_pool(pipeline, **params)`` (the items to run; else pass a JSONL
pool), ``export(results_path)`` (called after a run, returns the exported file),
``mapper(record)`` (the conversation ``datagen export`` makes of a record) and, for the
single-step form, ``extract_function`` or ``parse_response``.
The ``params:`` section of config.yaml reaches ``build`` and ``data_pool`` as keywords; a
key neither takes gets a warning naming it, never a crash (so old configs keep working).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from datagen.errors import ConfigError, DatagenError
from datagen.pipeline import DataGenerationPipeline


def _accepts(fn: Callable[..., Any] | None) -> tuple[set[str], bool]:
    """The keyword names ``fn`` takes after its first parameter, and whether it takes any."""
    if fn is None:
        return set(), False
    params = list(inspect.signature(fn).parameters.values())[1:]
    return ({p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)},
            any(p.kind == p.VAR_KEYWORD for p in params))


def _pick(fn: Callable[..., Any] | None, params: dict[str, Any]) -> dict[str, Any]:
    names, everything = _accepts(fn)
    return dict(params) if everything else {k: v for k, v in params.items() if k in names}


@dataclass
class PipelineFolder:
    path: Path
    pipeline: DataGenerationPipeline
    module: ModuleType | None

    @property
    def has_data_pool(self) -> bool:
        return callable(getattr(self.module, "data_pool", None))

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.pipeline.settings.params)

    def data_pool(self) -> Any:
        fn = getattr(self.module, "data_pool", None)
        if fn is None:
            raise ConfigError(f"{self.path}: no data pool: add `def data_pool(pipeline, "
                              "**params)` to pipeline.py, or pass --pool FILE.jsonl")
        return call_user(self.path / "pipeline.py", "data_pool()", fn, self.pipeline,
                         **_pick(fn, self.params))

    @property
    def extract_function(self) -> Callable[[str], Any] | None:
        """For the single-step form: the module's ``extract_function`` or
        ``parse_response``."""
        for name in ("extract_function", "parse_response"):
            fn = getattr(self.module, name, None)
            if callable(fn):
                return fn  # type: ignore[no-any-return]
        return None

    @property
    def mapper(self) -> Callable[[dict[str, Any]], Any] | None:
        """pipeline.py's ``mapper(record)``: the conversation an export makes of a record."""
        fn = getattr(self.module, "mapper", None)
        return fn if callable(fn) else None

    def export(self, results: Path) -> Path | None:
        fn = getattr(self.module, "export", None)
        if fn is None:
            return None
        return Path(call_user(self.path / "pipeline.py", "export()", fn, results))


def load_mapper(spec: str) -> Callable[[dict[str, Any]], Any]:
    """A mapper named on the command line: ``FILE.py:NAME``, a pipeline folder or its
    ``pipeline.py`` (its ``mapper``), or ``module:NAME``."""
    where, _, name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    path = Path(where).expanduser()
    if path.is_dir():
        path = path / "pipeline.py"
    if path.suffix == ".py" and path.is_file():
        module = import_pipeline_module(path.resolve())
    elif path.suffix == ".py" or not name:
        raise ConfigError(f"--mapper {spec}: no such file; write FILE.py:NAME, a pipeline "
                          "folder, or module:NAME")
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"--mapper {spec}: cannot import {where}: {exc}") from None
    fn = getattr(module, name or "mapper", None)
    if not callable(fn):
        raise ConfigError(f"--mapper {spec}: {path if path.suffix == '.py' else where} has "
                          f"no function {name or 'mapper'}")
    return fn  # type: ignore[no-any-return]


def mapper_of_run(config_file: str | None) -> tuple[Callable[[dict[str, Any]], Any], Path
                                                     ] | None:
    """The ``mapper`` of the pipeline folder a run came from (its manifest's config file
    sits in that folder), with the pipeline.py it came from; None when it has none."""
    if not config_file:
        return None
    script = Path(config_file).parent / "pipeline.py"
    if not script.is_file():
        return None
    fn = getattr(import_pipeline_module(script), "mapper", None)
    return (fn, script) if callable(fn) else None


def user_code_error(path: Path, what: str, exc: BaseException) -> ConfigError:
    """An exception from the user's pipeline.py as one clear error: what raised, where
    (the last line of pipeline.py in the traceback), and why."""
    line = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename) == path:
            line = f", line {frame.lineno}"
    return ConfigError(f"{path}{line}: {what} raised {type(exc).__name__}: {exc}")


def call_user(path: Path, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
              ) -> Any:
    """Call a function of pipeline.py; what it raises is one clear ConfigError."""
    try:
        return fn(*args, **kwargs)
    except DatagenError:
        raise
    except Exception as exc:
        raise user_code_error(path, what, exc) from exc


def import_pipeline_module(path: Path) -> ModuleType:
    """Import pipeline.py as a module registered in sys.modules (pydantic and dataclasses
    look their module up there: a model in a ``from __future__ import annotations`` file
    would not build otherwise)."""
    name = f"datagen_pipeline_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))  # so pipeline.py can import its siblings
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise ConfigError(f"{path}, line {exc.lineno}: syntax error: {exc.msg}") from None
    except ImportError as exc:
        sys.modules.pop(name, None)
        raise ConfigError(f"{path}: cannot import what it needs: {exc}") from exc
    except DatagenError:
        sys.modules.pop(name, None)
        raise
    except Exception as exc:  # a NameError, a failing top-level call: the user's code
        sys.modules.pop(name, None)
        raise user_code_error(path, "importing it", exc) from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def load_folder(path: str | Path = ".", **overrides: Any) -> PipelineFolder:
    """Load a pipeline folder (or a bare config file: the single-step form)."""
    root = Path(path).expanduser().resolve()
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        return PipelineFolder(root.parent, DataGenerationPipeline(config=root, **overrides),
                              None)
    script, config = root / "pipeline.py", root / "config.yaml"
    if not root.is_dir():
        raise ConfigError(f"{root}: no such pipeline folder or config file")
    if not script.is_file():
        if config.is_file():
            return PipelineFolder(root, DataGenerationPipeline(config=config, **overrides),
                                  None)
        raise ConfigError(f"{root} has neither pipeline.py nor config.yaml: run `datagen "
                          "init NAME` to create a pipeline folder")
    module = import_pipeline_module(script)
    build = getattr(module, "build", None)
    if callable(build):
        base = DataGenerationPipeline(config=config if config.is_file() else None, **overrides)
        params = dict(base.settings.params)
        taken = _pick(build, params)
        pool_taken = _pick(getattr(module, "data_pool", None), params)
        for key in sorted(set(params) - set(taken) - set(pool_taken)):
            warnings.warn(f"params.{key} in {config} is not taken by build() or data_pool() "
                          f"in {script}; ignored", stacklevel=2)
        built = call_user(script, "build()", build, base, **taken)
        pipeline = built if built is not None else base
    elif isinstance(getattr(module, "pipeline", None), DataGenerationPipeline):
        pipeline = module.pipeline.with_overrides(**overrides) if overrides else \
            module.pipeline
    else:
        raise ConfigError(f"{script} must define `build(pipeline, **params)` or a "
                          "module-level `pipeline` (a DataGenerationPipeline)")
    if not isinstance(pipeline, DataGenerationPipeline):
        raise ConfigError(f"{script}: build() returned {type(pipeline).__name__}, not a "
                          "DataGenerationPipeline")
    pipeline._shard_origin = functools.partial(shard_job, root, overrides)
    return PipelineFolder(root, pipeline, module)


def shard_job(root: Path, overrides: dict[str, Any], options: Any, base: dict[str, Any],
              **shard: Any) -> Any:
    """A cluster run's shard job, made on the worker from the pipeline folder (loaded
    again there, at the same path: the folder must be on the shared filesystem)."""
    from datagen.prepare import prepare_shard

    folder = load_folder(root, **overrides)
    pipeline = folder.pipeline
    extractor = None if pipeline.step_names else folder.extract_function
    return prepare_shard(pipeline.settings, pipeline._plan(extractor), options, base, **shard)
