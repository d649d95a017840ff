//! The configuration loader on any text: it answers with a configuration or an error,
//! never a panic (the agent reloads whatever lands in its configuration directory, or
//! whatever the Kubernetes API serves).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = weft_agent::config::load_str(std::path::Path::new("fuzz.yaml"), text);
    // The same documents as the Kubernetes API would serve them, one by one.
    if let Ok(serde_json::Value::Array(objects)) = serde_json::from_str(text) {
        let first = weft_agent::config::from_api(objects.iter(), None);
        let _ = weft_agent::config::from_api(objects.iter(), Some(&first.config));
    }
});
