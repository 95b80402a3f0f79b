"""Language tag with the real lingua detector."""

import pytest

from magpie.stages.language import detect_languages, get_detector

SAMPLES = {
    "EN": "How do I bake a loaf of sourdough bread at home?",
    "ZH": "请帮我写一首关于秋天的诗。",
    "FR": "Pouvez-vous m'expliquer comment fonctionne la photosynthèse ?",
    "DE": "Wie kann ich meine Zeit während des Studiums besser einteilen?",
    "ES": "¿Cuáles son los principales riesgos de invertir en criptomonedas?",
    "JA": "東京でおすすめの観光地を教えてください。",
    "RU": "Объясни, пожалуйста, как работает квантовый компьютер.",
    "AR": "ما هي أفضل طريقة لتعلم لغة جديدة بسرعة؟",
}


@pytest.mark.parametrize("low_accuracy", [False, True])
def test_detects_several_languages(low_accuracy: bool) -> None:
    codes = detect_languages(list(SAMPLES.values()), low_accuracy=low_accuracy)
    assert codes == list(SAMPLES)


def test_empty_and_undetectable_give_none() -> None:
    texts = ["", "   \n", None, "12345 67", "Tell me a joke about cats."]
    assert detect_languages(texts) == [None, None, None, None, "EN"]


def test_no_texts() -> None:
    assert detect_languages([]) == []


def test_detector_is_built_once_per_mode() -> None:
    assert get_detector(False) is get_detector(False)
    assert get_detector(True) is get_detector(True)
    assert get_detector(True) is not get_detector(False)
