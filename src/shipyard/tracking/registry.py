"""The model registry: models, numbered versions, and aliases that move with a recorded history.

A version is registered from a run's artifact (or a stored blob). Only formats that load without
unpickling are accepted: ONNX is read as a protobuf, and its signature (input/output names,
datatypes, shapes) is taken from the graph itself, so serving can validate requests against it.
A model must be self-contained: one whose tensors refer to external data files is refused, since
those references are file paths that would be opened on the serving host.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shipyard.context import Context, new_id
from shipyard.domain.models import (
    AliasEvent,
    ModelExampleTensor,
    ModelParity,
    ModelSignature,
    ModelVersion,
    RegisteredModel,
)
from shipyard.domain.names import validate_name, validate_relative_path
from shipyard.domain.principals import Role
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.security import audit
from shipyard.security.blobrefs import add_refs, require_refs
from shipyard.security.rbac import authorize
from shipyard.store.queries import add_edge, project_id
from shipyard.store.tables import (
    AliasEventRow,
    ModelAliasRow,
    ModelRow,
    ModelVersionRow,
    ProjectRow,
    RunArtifactRow,
    RunRow,
    aware,
    utcnow,
)
from shipyard.tracking.convert import check_example
from shipyard.tracking.formats import parse_onnx, refuse_external_data, tensor_specs, to_signature
from shipyard.tracking.runs import latest_metrics

SUPPORTED_FORMATS = ("onnx",)
RESERVED_ALIASES = ("latest",)
MAX_VERSION = 2**31 - 1


def register_version(
    ctx: Context,
    *,
    project: str,
    model: str,
    run_id: str | None = None,
    artifact_path: str | None = None,
    digest: str | None = None,
    format: str = "onnx",
    description: str = "",
    example: list[ModelExampleTensor] | None = None,
    parity: ModelParity | None = None,
) -> ModelVersion:
    """Register a new version of ``model`` from a run's artifact or a stored blob.

    ``example`` (a few rows of input, checked against the graph's inputs) and ``parity`` (how
    the SDK's conversion matched its source model, see ``tracking.convert``) are kept in the
    version's signature.
    """
    validate_name(model, field="model")
    authorize(ctx, project=project, need=Role.EDITOR, registers_model=True)
    if format not in SUPPORTED_FORMATS:
        raise InvalidInputError(
            f"format {format!r} is not supported; use one of {', '.join(SUPPORTED_FORMATS)} "
            "(pickled models are refused: loading them runs arbitrary code)",
            field="format",
        )
    if artifact_path is not None:
        validate_relative_path(artifact_path, field="artifact_path")
    named_digest = digest is not None
    if digest is None:
        if run_id is None or artifact_path is None:
            raise InvalidInputError(
                "give either run_id and artifact_path, or a blob digest", field="artifact_path"
            )
        with ctx.db.read() as s:
            artifact = s.scalar(
                select(RunArtifactRow).where(
                    RunArtifactRow.run_id == run_id, RunArtifactRow.path == artifact_path
                )
            )
            run_project = s.scalar(
                select(ProjectRow.name)
                .join(RunRow, RunRow.project_id == ProjectRow.id)
                .where(RunRow.id == run_id)
            )
            if artifact is None or run_project != project:
                # a run of another project is as missing as one without the artifact
                raise NotFoundError(
                    f"run {run_id} has no artifact {artifact_path!r}", field="artifact_path"
                )
            digest = artifact.digest
    else:
        # a blob named directly must be one the project holds - naming a run does not change
        # that - and the run it names (lineage, metrics) one of this project: another project's
        # run is as missing as one that does not exist
        if run_id is not None:
            with ctx.db.read() as s:
                _require_run_in(s, run_id=run_id, project_pk=project_id(s, project, create=False))
        require_refs(ctx, project=project, digests=[digest], field="digest")
    content = ctx.blobs.get_bytes(digest)  # verified; outside any transaction
    signature = _signature(format, content, field="digest" if named_digest else "artifact_path")
    if example is not None:
        check_example(signature, example)
    signature = signature.model_copy(update={"example": example, "parity": parity})
    with ctx.db.transaction() as s:
        pid = project_id(s, project, create=True)
        add_refs(s, project_pk=pid, digests=[digest])
        metrics: dict[str, float] = {}
        if run_id is not None:
            _require_run_in(s, run_id=run_id, project_pk=pid)
            metrics = latest_metrics(s, run_id)
        model_row = s.scalar(
            select(ModelRow).where(ModelRow.project_id == pid, ModelRow.name == model)
        )
        if model_row is None:
            model_row = ModelRow(id=new_id(), project_id=pid, name=model)
            s.add(model_row)
            s.flush()
        number = (
            s.scalar(
                select(func.max(ModelVersionRow.version)).where(
                    ModelVersionRow.model_id == model_row.id
                )
            )
            or 0
        ) + 1
        row = ModelVersionRow(
            id=new_id(),
            model_id=model_row.id,
            version=number,
            format=format,
            artifact_digest=digest,
            artifact_size=len(content),
            signature=signature.model_dump(mode="json"),
            metrics=metrics,
            source_run_id=run_id,
            description=description,
        )
        s.add(row)
        if run_id is not None:
            add_edge(
                s,
                source_kind="run",
                source_id=run_id,
                target_kind="model_version",
                target_id=row.id,
                relation="output",
            )
        audit.record(
            s,
            actor=ctx.actor,
            action="model.register",
            resource=f"project/{project}/model/{model}/v{number}",
            details={"digest": digest, "run_id": run_id},
        )
        s.flush()
        return _version(s, row, project, model)


def get_version(
    ctx: Context, *, project: str, model: str, ref: str | int = "latest"
) -> ModelVersion:
    """Resolve ``ref`` (a version number, ``vN``, an alias, or ``latest``) to a model version."""
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        model_row = _require_model(s, project, model)
        row = _resolve(s, model_row, ref)
        return _version(s, row, project, model)


def list_models(ctx: Context, *, project: str) -> list[RegisteredModel]:
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        pid = project_id(s, project, create=False)
        rows = s.scalars(select(ModelRow).where(ModelRow.project_id == pid).order_by(ModelRow.name))
        return [_model(s, r, project) for r in rows]


def get_model(ctx: Context, *, project: str, model: str) -> RegisteredModel:
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        return _model(s, _require_model(s, project, model), project)


def list_versions(ctx: Context, *, project: str, model: str) -> list[ModelVersion]:
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        model_row = _require_model(s, project, model)
        rows = s.scalars(
            select(ModelVersionRow)
            .where(ModelVersionRow.model_id == model_row.id)
            .order_by(ModelVersionRow.version)
        )
        return [_version(s, r, project, model) for r in rows]


def set_alias(
    ctx: Context, *, project: str, model: str, alias: str, version: int | str
) -> ModelVersion:
    """Point ``alias`` at a version; the move is recorded in the alias history and the audit log."""
    _check_alias(alias)
    authorize(ctx, project=project, need=Role.EDITOR)
    with ctx.db.transaction() as s:
        model_row = _require_model(s, project, model)
        target = _resolve(s, model_row, version)
        current = s.get(ModelAliasRow, (model_row.id, alias))
        previous = current.version if current else None
        if current is None:
            s.add(ModelAliasRow(model_id=model_row.id, alias=alias, version=target.version))
        else:
            current.version = target.version
        s.add(
            AliasEventRow(
                model_id=model_row.id,
                alias=alias,
                version=target.version,
                previous_version=previous,
                actor=ctx.actor,
            )
        )
        audit.record(
            s,
            actor=ctx.actor,
            action="model.alias.set",
            resource=f"project/{project}/model/{model}/alias/{alias}",
            details={"version": target.version, "previous_version": previous},
        )
        s.flush()
        return _version(s, target, project, model)


def delete_alias(ctx: Context, *, project: str, model: str, alias: str) -> None:
    _check_alias(alias)
    authorize(ctx, project=project, need=Role.EDITOR)
    with ctx.db.transaction() as s:
        model_row = _require_model(s, project, model)
        current = s.get(ModelAliasRow, (model_row.id, alias))
        if current is None:
            raise NotFoundError(f"model {model!r} has no alias {alias!r}", field="alias")
        s.add(
            AliasEventRow(
                model_id=model_row.id,
                alias=alias,
                version=None,
                previous_version=current.version,
                actor=ctx.actor,
            )
        )
        s.delete(current)
        audit.record(
            s,
            actor=ctx.actor,
            action="model.alias.delete",
            resource=f"project/{project}/model/{model}/alias/{alias}",
            details={"previous_version": current.version},
        )


def alias_history(ctx: Context, *, project: str, model: str) -> list[AliasEvent]:
    authorize(ctx, project=project, need=Role.VIEWER)
    with ctx.db.read() as s:
        model_row = _require_model(s, project, model)
        rows = s.scalars(
            select(AliasEventRow)
            .where(AliasEventRow.model_id == model_row.id)
            .order_by(AliasEventRow.id)
        )
        return [
            AliasEvent(
                model=model,
                alias=r.alias,
                version=r.version,
                previous_version=r.previous_version,
                actor=r.actor,
                at=aware(r.at) or utcnow(),
            )
            for r in rows
        ]


# --- helpers ------------------------------------------------------------------------------------


def _require_run_in(s: Session, *, run_id: str, project_pk: str) -> None:
    """The run ``run_id`` of the project ``project_pk``, or the error a missing run gets."""
    run = s.get(RunRow, run_id)
    if run is None or run.project_id != project_pk:
        raise NotFoundError(f"run {run_id!r} does not exist", field="run_id")


def _signature(format: str, content: bytes, *, field: str) -> ModelSignature:
    """The model's signature, once it is known to be a loadable, self-contained model."""
    try:
        model = parse_onnx(content)
        inputs, outputs = tensor_specs(model)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"the artifact is not a loadable {format} model: {exc.message}", field=field
        ) from None
    except Exception as exc:
        raise InvalidInputError(
            f"the artifact is not a loadable {format} model: {exc}", field=field
        ) from None
    try:
        refuse_external_data(model, field=field)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"the artifact cannot be served: {exc.message}", field=field
        ) from None
    return ModelSignature(
        inputs=[to_signature(t) for t in inputs], outputs=[to_signature(t) for t in outputs]
    )


def _check_alias(alias: str) -> None:
    validate_name(alias, field="alias")
    if alias.isdigit() or (alias[0] == "v" and alias[1:].isdigit()) or alias in RESERVED_ALIASES:
        raise InvalidInputError(
            f"alias {alias!r} would be confused with a version reference; pick a word such as "
            "'production' or 'staging'",
            field="alias",
        )


def _require_model(s: Session, project: str, model: str) -> ModelRow:
    validate_name(model, field="model")
    pid = project_id(s, project, create=False)
    row = s.scalar(select(ModelRow).where(ModelRow.project_id == pid, ModelRow.name == model))
    if row is None:
        raise NotFoundError(f"model {model!r} does not exist in project {project!r}", field="model")
    return row


def _resolve(s: Session, model_row: ModelRow, ref: str | int) -> ModelVersionRow:
    number: int | None = None
    text = str(ref)
    if isinstance(ref, int) or text.isdigit():
        number = int(text)
    elif text[:1] == "v" and text[1:].isdigit():
        number = int(text[1:])
    elif text == "latest":
        number = s.scalar(
            select(func.max(ModelVersionRow.version)).where(
                ModelVersionRow.model_id == model_row.id
            )
        )
        if number is None:
            raise NotFoundError(f"model {model_row.name!r} has no versions yet", field="ref")
    else:
        alias = s.get(ModelAliasRow, (model_row.id, text))
        if alias is None:
            raise NotFoundError(f"model {model_row.name!r} has no alias {text!r}", field="ref")
        number = alias.version
    # A number beyond what a version can be is no version (and must not reach the store's int64).
    row = (
        s.scalar(
            select(ModelVersionRow).where(
                ModelVersionRow.model_id == model_row.id, ModelVersionRow.version == number
            )
        )
        if number is not None and 0 <= number <= MAX_VERSION
        else None
    )
    if row is None:
        raise NotFoundError(f"model {model_row.name!r} has no version {number}", field="ref")
    return row


def _aliases(s: Session, model_id: str) -> dict[str, int]:
    return dict(
        s.execute(
            select(ModelAliasRow.alias, ModelAliasRow.version).where(
                ModelAliasRow.model_id == model_id
            )
        ).all()
    )


def _model(s: Session, row: ModelRow, project: str) -> RegisteredModel:
    latest = s.scalar(
        select(func.max(ModelVersionRow.version)).where(ModelVersionRow.model_id == row.id)
    )
    return RegisteredModel(
        id=row.id,
        project=project,
        name=row.name,
        created_at=aware(row.created_at) or utcnow(),
        latest_version=latest,
        aliases=_aliases(s, row.id),
    )


def _version(s: Session, row: ModelVersionRow, project: str, model: str) -> ModelVersion:
    aliases = sorted(a for a, v in _aliases(s, row.model_id).items() if v == row.version)
    return ModelVersion(
        id=row.id,
        project=project,
        model=model,
        version=row.version,
        format=row.format,
        artifact_digest=row.artifact_digest,
        artifact_size=row.artifact_size,
        signature=ModelSignature.model_validate(row.signature),
        metrics=dict(row.metrics),
        source_run_id=row.source_run_id,
        description=row.description,
        created_at=aware(row.created_at) or utcnow(),
        aliases=aliases,
    )
