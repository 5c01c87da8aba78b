//! gRPC services, authentication, health, reflection and metrics.
