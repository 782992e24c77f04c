"""Konstruct's deployment files, shipped as this package's data so that an installed
Konstruct has them too: `migrations/*.sql`, the default router and simulator configs
(`llm-router.yaml`, `simulator.yaml`), the sample datasets (`datasets/`) and the
compose files (`compose/`). Code finds them through
`konstruct.platform.settings.deploy_dir()` (importlib.resources): in an editable install
or a checkout that is this folder itself.
"""
