"""[privacy] in the plan and in a site config: read, checked, and kept out of old digests."""

from __future__ import annotations

import pytest

from agent.config import PrivacySpec, SitePrivacy, load_plan, load_site_config, plan_from_dict
from agent.config.plan import plan_to_toml_dict
from agent.errors import ConfigError
from agent.federation.coordinator import plan_digest
from tests.test_config import PLAN, SITE, write

FEDAVG = PLAN.replace('kind = "mlp"\nhidden = [8, 4]', 'kind = "logistic"')


def test_a_plan_without_privacy_keeps_its_digest_and_gets_the_defaults(tmp_path):
    plain = load_plan(write(tmp_path, PLAN))
    same = load_plan(write(tmp_path, PLAN + "\n[privacy]\nmin_cell = 10\n", "b.toml"))
    assert plain.privacy == same.privacy == PrivacySpec()
    assert "privacy" not in plain.to_dict()
    assert plan_digest(plain) == plan_digest(same)


def test_privacy_settings_round_trip_and_change_the_digest(tmp_path):
    text = PLAN + ('\n[privacy]\nmin_cell = 20\nsecure_aggregation = true\nvalue_bound = 0.25\n'
                   'dp = "client"\ndp_clip = 0.5\ndp_noise_multiplier = 1.1\ndp_epsilon = 4.0\n'
                   'dp_delta = 1e-6\n')
    plan = load_plan(write(tmp_path, text))
    assert plan.privacy == PrivacySpec(min_cell=20, secure_aggregation=True, value_bound=0.25,
                                       dp="client", dp_clip=0.5, dp_noise_multiplier=1.1,
                                       dp_epsilon=4.0, dp_delta=1e-6)
    assert plan_from_dict(plan_to_toml_dict(plan)).privacy == plan.privacy
    assert plan_digest(plan) != plan_digest(load_plan(write(tmp_path, PLAN, "b.toml")))


@pytest.mark.parametrize(("extra", "key", "problem"), [
    ('[privacy]\nmin_cell = 0\n', "privacy.min_cell", ">= 1"),
    ('[privacy]\ndp = "local"\n', "privacy.dp", "one of"),
    ('[privacy]\nepsilon = 1.0\n', "privacy.epsilon", "unknown"),
    ('[strategy]\nname = "median"\n[privacy]\nsecure_aggregation = true\n',
     "privacy.secure_aggregation", "compares updates"),
    ('[compression]\ntopk_fraction = 0.1\n[privacy]\nsecure_aggregation = true\n',
     "privacy.secure_aggregation", "top-k"),
    ('[compression]\ntopk_fraction = 0.1\n[privacy]\ndp = "client"\n', "privacy.dp",
     "residual"),
])
def test_privacy_plan_errors_name_key_and_problem(tmp_path, extra, key, problem):
    with pytest.raises(ConfigError) as info:
        load_plan(write(tmp_path, FEDAVG + "\n" + extra))
    assert info.value.key == key and problem in info.value.problem


def test_site_privacy_allow_lists(tmp_path):
    site = load_site_config(write(tmp_path, SITE + '\n[privacy]\nallowed_features = ["age"]\n'
                                  'allowed_model_kinds = ["logistic"]\nmin_cell = 25\n'
                                  'require_secure_aggregation = true\nmax_epsilon = 3.0\n'))
    assert site.privacy == SitePrivacy(allowed_features=("age",),
                                       allowed_model_kinds=("logistic",), min_cell=25,
                                       require_secure_aggregation=True, max_epsilon=3.0)
    assert load_site_config(write(tmp_path, SITE, "b.toml")).privacy == SitePrivacy()
    with pytest.raises(ConfigError) as info:
        load_site_config(write(tmp_path, SITE + '\n[privacy]\nallowed_features = ["a b"]\n',
                               "c.toml"))
    assert info.value.key == "privacy.allowed_features"
