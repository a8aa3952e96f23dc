//! SmolLM2's chat template (ChatML, from its tokenizer_config.json) rendering fuzzed messages:
//! the input is a JSON list of `{"role", "content"}` objects, or raw text as one user turn.
#![no_main]
use libfuzzer_sys::fuzz_target;

const TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fuzz_target!(|data: &[u8]| {
    let template = ferrule::data::ChatTemplate::new(TEMPLATE, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
    let line = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(messages) => serde_json::json!({ "messages": messages }),
        Err(_) => serde_json::json!({ "messages": [{ "role": "user", "content": String::from_utf8_lossy(data) }] }),
    };
    let Ok(examples) = ferrule::data::parse_jsonl(std::path::Path::new("fuzz.jsonl"), line.to_string().as_bytes()) else { return };
    for e in &examples {
        if let ferrule::data::Example::Chat { messages, .. } = e {
            let _ = template.render(messages, true);
            let _ = template.render(messages, false);
        }
    }
});
