//! Inference threads, request queues, batching and the vision feature cache.
