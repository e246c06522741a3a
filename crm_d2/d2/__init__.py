"""The detectron2 layer of crm_d2: every module here imports detectron2.

- :mod:`crm_d2.d2.config`: ``add_crm_config`` (the ``MODEL.CRM`` keys) and YAML loading.
- :mod:`crm_d2.d2.meta_arch`: ``CRMRefinedModel`` (importing it registers the
  meta-architecture).
- :mod:`crm_d2.d2.simulator`: ``CoarseGTSimulator``, a simulated inner model.
- :mod:`crm_d2.d2.data`: ``OriginalImageMapper`` and dataset registration by paths.
- :mod:`crm_d2.d2.evaluators`: entity AP and the before/after evaluator.

Nothing is imported here, so ``import crm_d2.d2.config`` does not register models.
"""
