"""The messages of the KServe v2 / Triton gRPC inference service (``inference.*``).

``grpc_service.proto`` and ``model_config.proto`` are Triton's (triton-inference-server/common,
``protobuf/``, BSD-3-Clause), vendored unmodified; Triton's service is a superset of KServe's
``grpc_predict_v2.proto`` with the same package, service name and field numbers, so
``tritonclient.grpc`` and KServe's gRPC clients both speak to it.

Their compiled descriptors (``_descriptors.py``, made by ``scripts/generate_oip_proto.py``) are
loaded into a descriptor pool of our own instead of protobuf's default one, where protoc's
``_pb2`` modules would register them. ``tritonclient`` and KServe register the very same names
(``inference.ModelInferRequest``, ...) in the default pool, so generated modules would make the
server refuse to import next to either of them (or next to a different version of the same
files), and they would tie the server to the protobuf release that generated them. Messages are
matched on the wire by field number, never by pool, so nothing is lost.
"""

from __future__ import annotations

import base64

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from shipyard.serving.proto._descriptors import FILE_DESCRIPTOR_SET

SERVICE = "inference.GRPCInferenceService"

POOL = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(
    base64.b64decode("".join(FILE_DESCRIPTOR_SET))
).file:
    POOL.Add(_file)


def message_class(name: str) -> type[Message]:
    """The message class for ``inference.<name>`` (e.g. ``"ModelInferRequest"``)."""
    cls: type[Message] = message_factory.GetMessageClass(
        POOL.FindMessageTypeByName(f"inference.{name}")
    )
    return cls


ServerLiveRequest = message_class("ServerLiveRequest")
ServerLiveResponse = message_class("ServerLiveResponse")
ServerReadyRequest = message_class("ServerReadyRequest")
ServerReadyResponse = message_class("ServerReadyResponse")
ModelReadyRequest = message_class("ModelReadyRequest")
ModelReadyResponse = message_class("ModelReadyResponse")
ServerMetadataRequest = message_class("ServerMetadataRequest")
ServerMetadataResponse = message_class("ServerMetadataResponse")
ModelMetadataRequest = message_class("ModelMetadataRequest")
ModelMetadataResponse = message_class("ModelMetadataResponse")
ModelInferRequest = message_class("ModelInferRequest")
ModelInferResponse = message_class("ModelInferResponse")
ModelConfigRequest = message_class("ModelConfigRequest")
ModelConfigResponse = message_class("ModelConfigResponse")
ModelStatisticsRequest = message_class("ModelStatisticsRequest")
ModelStatisticsResponse = message_class("ModelStatisticsResponse")
RepositoryIndexRequest = message_class("RepositoryIndexRequest")
RepositoryIndexResponse = message_class("RepositoryIndexResponse")
InferTensorContents = message_class("InferTensorContents")
ModelConfig = message_class("ModelConfig")

__all__ = [
    "POOL",
    "SERVICE",
    "InferTensorContents",
    "ModelConfig",
    "ModelConfigRequest",
    "ModelConfigResponse",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ModelStatisticsRequest",
    "ModelStatisticsResponse",
    "RepositoryIndexRequest",
    "RepositoryIndexResponse",
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "message_class",
]
