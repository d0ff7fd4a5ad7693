//! The OpenAPI document and the router agree.

use mathia_tests::TestApp;

#[tokio::test]
async fn every_documented_operation_is_served_and_the_document_is_openapi_3_1() {
    let app = TestApp::spawn().await;
    let doc = app.get("/openapi.json", None).await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.body["openapi"], "3.1.0");
    assert!(doc.body["components"]["securitySchemes"]["bearer"].is_object());
    let paths = doc.body["paths"].as_object().unwrap();
    assert!(paths.len() >= 14, "{} paths", paths.len());
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path
            .replace("{wallet_id}", "00000000-0000-0000-0000-000000000000")
            .replace("{command_id}", "00000000-0000-0000-0000-000000000000");
        for (method, op) in ops.as_object().unwrap() {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} documents no response"
            );
            let req = app
                .http
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{}{concrete}", app.base),
                )
                .header("content-type", "application/json")
                .body("{}");
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            // Served means the router knows it: never the fallback's "no such endpoint" nor 405.
            assert_ne!(status, 405, "{method} {path}");
            assert!(
                !(status == 404 && body["detail"] == "no such endpoint"),
                "{method} {path} is documented but not routed"
            );
            checked += 1;
        }
    }
    assert!(checked >= 15);
    let docs = app
        .http
        .get(format!("{}/docs/", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), 200);
    app.stop().await;
}
