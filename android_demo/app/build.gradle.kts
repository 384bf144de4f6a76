plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.lieq.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.lieq.demo"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") } // the ABIs the ExecuTorch AAR ships
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
}

dependencies {
    // Runtime + XNNPACK + quantized/LLM custom kernels + LlmModule, in one AAR. Keep it at the
    // version of the executorch that exported the .pte (lieq-export pins executorch 1.5.x; the
    // AAR for 1.5 is 1.5.1). Its POM brings com.facebook.fbjni and soloader.
    implementation("org.pytorch:executorch-android:1.5.1")
}
