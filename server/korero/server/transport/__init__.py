"""Transports: wire frames in, engine calls; engine events out, wire frames.

`grpc_service` (ChatService over gRPC, also behind Envoy's gRPC-Web),
`websocket` (the full-duplex browser route), `chat_session` (the Chat-stream
rules both share), `outbound` (a stream's bounded event queue and its
interruptible writer), `lifecycle` (serving / draining), `interceptors` (the
call gate applied to every gRPC call) and `status` (errors as gRPC statuses).
"""
