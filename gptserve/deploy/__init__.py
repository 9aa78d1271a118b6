"""Running past one process: gptserve as a Ray Serve application (an OpenAI ingress in
front of engine replicas, with prefix-affinity routing) and the Kubernetes manifests in
the repository's deploy/ folder. Nothing here is imported unless Ray is used
(`pip install "gptserve[ray]"`).

- spec.py: what an application is made of (model, engine, server, scaling, routing)
- engine_replica.py: the engine deployment, one AsyncEngine per replica
- remote_engine.py: the ingress's EngineClient over a handle to that deployment
- remote_errors.py: engine errors across the process boundary
- router.py: the request router (prefix affinity, least-loaded fallback)
- fleet.py: the ingress's view of the engine replicas (the router's, with their stats)
- replica_header.py: the `x-gptserve-replica` response header
- application.py: the ingress deployment and the application builders
- launch.py: `gptserve serve --ray`
"""
